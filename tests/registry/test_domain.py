"""The registry's decisions on a projection, without I/O (the rules; the integration tests
check the same rules through the real service)."""

from __future__ import annotations

import itertools

import pytest

from services.registry.domain import assignments, devices, sessions, vdisks
from services.registry.domain.errors import DomainError
from services.registry.domain.sessions import StreamNode, failover_nodes, pick_stream_node
from services.registry.projection import Projection
from shared.events import Event, SessionConflictRejected, VdiskChainMerged, envelope
from shared.identity import normalize_mac

NODE = StreamNode(node="s1", nbd="127.0.0.1:10809", http="http://127.0.0.1:18081")
_positions = itertools.count(1)


def apply(p: Projection, events: list[Event], when: float = 1000.0) -> None:
    for e in events:
        env = envelope(e)
        p.apply(env.type, env.data, next(_positions), when)


def with_vdisk(p: Projection, name: str = "win", versions: int = 1) -> None:
    for v in range(1, versions + 1):
        apply(
            p,
            vdisks.publish(
                p, name, version=v, stage=None, path=f"{name}/v{v}", size=1 << 20,
                checksum="sha256:x", changed_blocks=1, block_size=65536,
            ),
        )  # fmt: skip


def device(p: Projection, mac: str, **kw: object) -> str:
    apply(p, devices.register(p, mac, **kw))  # type: ignore[arg-type]
    return normalize_mac(mac)


def open_(p: Projection, mac: str, sid: str = "s-1", **kw: object) -> list[Event]:
    return sessions.open_session(
        p,
        mac=mac,
        session_id=sid,
        token_hash="h-" + sid,
        node=NODE,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("raw", ["52:54:00:AA:BB:CC", "52-54-00-aa-bb-cc", "525400aabbcc"])
def test_mac_forms_normalise(raw: str) -> None:
    assert normalize_mac(raw) == "52:54:00:aa:bb:cc"


@pytest.mark.parametrize(
    "raw", ["", "zz", "52:54:00:aa:bb", "52:54-00:aa:bb:cc", "g2:54:00:aa:bb:cc"]
)
def test_invalid_mac_named(raw: str) -> None:
    with pytest.raises(DomainError, match="invalid MAC") as e:
        normalize_mac(raw)
    assert e.value.kind == "invalid"


def test_hostname_and_machine_id_unique() -> None:
    p = Projection()
    device(p, "52:54:00:00:00:01", hostname="pc1")
    with pytest.raises(DomainError, match="hostname 'pc1' is already used") as e:
        devices.register(p, "52:54:00:00:00:02", hostname="PC1")
    assert e.value.kind == "conflict"
    with pytest.raises(DomainError, match="already exists"):
        devices.register(p, "52-54-00-00-00-01")
    mid = p.devices["52:54:00:00:00:01"]["machine_id"]
    with pytest.raises(DomainError, match="machine identifier"):
        devices.register(p, "52:54:00:00:00:03", machine_id=mid)


def test_unknown_device_policy() -> None:
    p = Projection()
    with pytest.raises(DomainError, match="refuses unknown devices") as e:
        devices.auto_add(
            p, "52:54:00:00:00:09", None, policy="refuse", template="lab-{n:03}", collection=None
        )
    assert e.value.kind == "refused"
    device(p, "52:54:00:00:00:01", hostname="lab-002")  # the template skips taken names
    for mac, want in (("52:54:00:00:00:09", "lab-001"), ("52:54:00:00:00:0a", "lab-003")):
        evs = devices.auto_add(
            p, mac, None, policy="auto-add", template="lab-{n:03}", collection="lab"
        )
        apply(p, evs)
        assert p.devices[mac]["hostname"] == want
        assert p.devices[mac]["collection"] == "lab"


def test_version_choice_by_role_promote_and_rollback() -> None:
    p = Projection()
    with_vdisk(p, versions=3)  # v1 production, v2 and v3 maintenance
    vd = p.vdisks["win"]
    assert vdisks.boot_version(vd, tester=False, maintenance=False) == 1
    assert vdisks.boot_version(vd, tester=True, maintenance=False) == 1
    assert vdisks.boot_version(vd, tester=False, maintenance=True) == 3
    apply(p, vdisks.promote(p, "win", 2, "test"))
    assert vdisks.boot_version(vd, tester=True, maintenance=False) == 2
    assert vdisks.boot_version(vd, tester=False, maintenance=False) == 1
    apply(p, vdisks.promote(p, "win", 2, "production"))
    assert vdisks.boot_version(vd, tester=False, maintenance=False) == 2
    with pytest.raises(DomainError, match="promotion only moves forward"):
        vdisks.promote(p, "win", 2, "test")
    apply(p, vdisks.rollback(p, "win"))
    assert vdisks.boot_version(vd, tester=False, maintenance=False) == 1
    # The withdrawn version is not booted by testers either.
    assert vdisks.boot_version(vd, tester=True, maintenance=False) == 1
    with pytest.raises(DomainError, match="no earlier production version"):
        vdisks.rollback(p, "win")
    assert vdisks.chain(vd, 3) == ["win/v1", "win/v2", "win/v3"]


def test_publish_needs_the_next_version() -> None:
    p = Projection()
    with_vdisk(p)
    with pytest.raises(DomainError, match="the next version is 2") as e:
        vdisks.publish(
            p,
            "win",
            version=3,
            stage=None,
            path="x",
            size=1,
            checksum="c",
            changed_blocks=1,
            block_size=1,
        )
    assert e.value.kind == "conflict"


def test_a_vdisk_is_read_from_a_configured_store() -> None:
    p = Projection()
    stores = ("local", "nas")

    def publish(version: int, store: str) -> list[Event]:
        return vdisks.publish(
            p, "win", version=version, stage=None, path=f"win/v{version}", size=1,
            checksum="c", changed_blocks=1, block_size=4096, store=store, stores=stores,
        )  # fmt: skip

    with pytest.raises(DomainError, match="unknown store 'ftp': configured are local, nas"):
        publish(1, "ftp")
    apply(p, publish(1, "nas"))
    assert p.vdisks["win"]["store"] == "nas"
    # A new version stays where the vdisk is; moving it is a policy change.
    with pytest.raises(DomainError, match="is in store 'nas'"):
        publish(2, "local")
    apply(p, vdisks.set_policy(p, "win", store="local", stores=stores))
    assert p.vdisks["win"]["store"] == "local"
    with pytest.raises(DomainError, match="unknown store 'gone'"):
        vdisks.set_policy(p, "win", store="gone", stores=stores)
    with_vdisk(p, "plain")
    assert p.vdisks["plain"]["store"] == "local"


def test_one_live_session_per_device_with_conflict_event() -> None:
    p = Projection()
    with_vdisk(p)
    mac = device(p, "52:54:00:00:00:01")
    apply(p, assignments.assign(p, "device", mac, "win", default=False))
    apply(p, open_(p, mac, "s-1"))
    with pytest.raises(DomainError, match="already has a live session") as e:
        open_(p, mac, "s-2")
    assert e.value.kind == "conflict"
    [rejected] = e.value.events
    assert isinstance(rejected, SessionConflictRejected)
    assert rejected.conflicting_session_id == "s-1"


def test_collection_assignment_and_default() -> None:
    p = Projection()
    with_vdisk(p, "a")
    with_vdisk(p, "b")
    mac = device(p, "52:54:00:00:00:01", collection="lab")
    with pytest.raises(DomainError, match="no vdisk assigned"):
        open_(p, mac)
    apply(p, assignments.assign(p, "collection", "lab", "a", default=False))
    apply(p, assignments.assign(p, "collection", "lab", "b", default=True))
    assert assignments.boot_choices(p, mac) == {
        "vdisks": ["a", "b"],
        "default": "b",
        "source": "collection lab",
    }
    [opened] = open_(p, mac)
    assert opened.vdisk == "b"  # type: ignore[attr-defined]
    with pytest.raises(DomainError, match="not assigned"):
        with_vdisk(p, "c")
        open_(p, mac, vdisk="c")


def test_private_and_maintenance_are_one_device_at_a_time() -> None:
    p = Projection()
    with_vdisk(p, versions=2)
    macs = [device(p, f"52:54:00:00:00:0{i}") for i in (1, 2)]
    for mac in macs:
        apply(p, assignments.assign(p, "device", mac, "win", default=False))
    apply(p, open_(p, macs[0], "s-1", maintenance=True))
    assert p.sessions["s-1"]["writes_to_vdisk"] and p.sessions["s-1"]["version"] == 2
    with pytest.raises(
        DomainError, match=r"in maintenance by device 52:54:00:00:00:01 \(live session s-1\)"
    ):
        open_(p, macs[1], "s-2", maintenance=True)
    [ok] = open_(p, macs[1], "s-3")  # the production version is shared
    assert ok.version == 1  # type: ignore[attr-defined]
    apply(p, sessions.close(p, p.sessions["s-1"], "done"))
    apply(p, vdisks.set_policy(p, "win", mode="private"))
    apply(p, open_(p, macs[0], "s-4"))
    with pytest.raises(DomainError, match="private and in use"):
        open_(p, macs[1], "s-5")


def test_disabled_device_refused_and_remove_guarded() -> None:
    p = Projection()
    with_vdisk(p)
    mac = device(p, "52:54:00:00:00:01")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    apply(p, devices.disable(p, mac))
    with pytest.raises(DomainError, match="disabled") as e:
        open_(p, mac)
    assert e.value.kind == "refused"
    apply(p, devices.enable(p, mac))
    apply(p, open_(p, mac))
    with pytest.raises(DomainError, match="has a live session"):
        devices.remove(p, mac)
    with pytest.raises(DomainError, match="in use by 1 live session"):
        vdisks.remove(p, "win")


def test_sweeper_waits_for_grace_after_detach() -> None:
    p = Projection()
    with_vdisk(p)
    mac = device(p, "52:54:00:00:00:01")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    apply(p, open_(p, mac), when=100.0)
    from shared.events import SessionAttached, SessionDetached

    att = {"session_id": "s-1", "stream_node": "n", "client_addr": "c"}
    apply(p, [SessionAttached(protocol="http", **att)], when=110.0)
    apply(p, [SessionDetached(protocol="http", bytes_read=1, bytes_written=0, **att)], when=120.0)
    rules = {"idle_timeout_s": 600.0, "detach_grace_s": 30.0}
    assert sessions.expired(p, 140.0, **rules) == []  # PXE: HTTP gone, NBD not yet
    apply(p, [SessionAttached(protocol="nbd", **att)], when=125.0)
    assert sessions.expired(p, 1000.0, **rules) == []  # attached: never swept
    apply(p, [SessionDetached(protocol="nbd", bytes_read=1, bytes_written=0, **att)], when=1000.0)
    assert sessions.expired(p, 1029.0, **rules) == []
    assert sessions.expired(p, 1030.0, **rules) == [("s-1", "client-gone")]


def test_sweeper_idle_timeout_for_sessions_never_attached() -> None:
    p = Projection()
    with_vdisk(p)
    mac = device(p, "52:54:00:00:00:01")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    apply(p, open_(p, mac), when=100.0)
    assert sessions.expired(p, 699.0, idle_timeout_s=600, detach_grace_s=30) == []
    assert sessions.expired(p, 700.0, idle_timeout_s=600, detach_grace_s=30) == [
        ("s-1", "idle-timeout")
    ]


def test_placement_least_loaded_alive_stream_node() -> None:
    beats = [
        {
            "service": "stream",
            "node": "a",
            "alive": True,
            "load": 5,
            "nbd": "h:1",
            "http_stream": "http://h:2",
        },
        {
            "service": "stream",
            "node": "b",
            "alive": True,
            "load": 1,
            "nbd": "h:3",
            "http_stream": "http://h:4",
        },
        {
            "service": "stream",
            "node": "c",
            "alive": False,
            "load": 0,
            "nbd": "h:5",
            "http_stream": "http://h:6",
        },
        {"service": "cache", "node": "d", "alive": True, "load": 0},
    ]
    assert pick_stream_node(beats) == StreamNode("b", "h:3", "http://h:4", 1.0)
    assert pick_stream_node(beats[2:]) is None
    # The failover list: the other live nodes, least loaded first; never dead ones.
    assert failover_nodes(beats, StreamNode("b", "h:3", "http://h:4", 1.0)) == ["h:1"]
    more = [*beats, {**beats[0], "node": "e", "load": 2, "nbd": "h:7"}]
    assert failover_nodes(more, StreamNode("b", "h:3", "http://h:4", 1.0)) == ["h:7", "h:1"]


def replay_(p: Projection, original: str, sid: str = "r-1") -> list[Event]:
    """A replay of ``original`` (a session opened in this projection, live or not)."""
    return sessions.open_replay(
        p, original=ORIGINALS[original], session_id=sid, token_hash="h-" + sid, node=NODE
    )


ORIGINALS: dict[str, dict[str, object]] = {}


def opened_and_kept(p: Projection, mac: str, sid: str, **kw: object) -> None:
    """Open a session and keep its SessionOpened data, as the log would."""
    events = open_(p, mac, sid, **kw)
    ORIGINALS[sid] = envelope(events[0]).data
    apply(p, events)


def test_a_replay_is_not_the_device_and_ends_like_any_session() -> None:
    p = Projection()
    with_vdisk(p)
    mac = device(p, "52:54:00:00:00:01", hostname="pc1")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    opened_and_kept(p, mac, "s-1")
    apply(p, sessions.close(p, p.sessions["s-1"], "done"))
    [ev] = replay_(p, "s-1")
    env = envelope(ev)
    assert env.type == "ReplaySessionOpened" and "mac" not in env.data  # not in --mac views
    assert env.data["replay_of"] == "s-1" and env.data["write_cache_persistence"] == "discard"
    apply(p, [ev])
    assert "r-1" in p.sessions and mac not in p.session_by_mac
    # The device boots while its replay runs (same hostname, same machine id: no conflict),
    # and a second replay may run beside the first.
    opened_and_kept(p, mac, "s-2")
    assert p.session_by_mac[mac] == "s-2"
    apply(p, replay_(p, "s-1", "r-2"))
    # A replay holds its vdisk version's files: the vdisk cannot be removed under it.
    apply(p, sessions.close(p, p.sessions["s-2"], "done"))
    apply(p, sessions.close(p, p.sessions["r-2"], "done"))
    with pytest.raises(DomainError, match="in use by 1 live session"):
        vdisks.remove(p, "win")
    assert sessions.expired(p, 1000.0 + 600, idle_timeout_s=600, detach_grace_s=30) == [
        ("r-1", "idle-timeout")
    ]
    apply(p, sessions.close(p, p.sessions["r-1"], "replay-finished"))
    assert p.sessions == {} and p.session_by_token_hash == {}


def test_a_replay_does_not_block_a_private_or_maintenance_boot() -> None:
    p = Projection()
    with_vdisk(p, versions=2)
    mac = device(p, "52:54:00:00:00:01")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    opened_and_kept(p, mac, "s-1", maintenance=True)
    apply(p, sessions.close(p, p.sessions["s-1"], "done"))
    [ev] = replay_(p, "s-1")
    # The maintenance session's kept cache is the device's: its replay writes elsewhere.
    assert (ev.write_cache, ev.write_cache_persistence) == ("server-disk", "discard")  # type: ignore[attr-defined]
    apply(p, [ev])
    opened_and_kept(p, mac, "s-2", maintenance=True)
    apply(p, sessions.close(p, p.sessions["s-2"], "done"))
    apply(p, vdisks.set_policy(p, "win", mode="private"))
    opened_and_kept(p, mac, "s-3")


def test_a_replay_needs_its_vdisk_version() -> None:
    p = Projection()
    with_vdisk(p)
    mac = device(p, "52:54:00:00:00:01")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    opened_and_kept(p, mac, "s-1")
    apply(p, sessions.close(p, p.sessions["s-1"], "done"))
    ORIGINALS["s-9"] = {**ORIGINALS["s-1"], "session_id": "s-9", "version": 7}
    with pytest.raises(DomainError, match="version 7 of session s-9 is gone") as e:
        replay_(p, "s-9")
    assert e.value.kind == "not_found"
    apply(p, vdisks.remove(p, "win"))
    with pytest.raises(DomainError, match="vdisk 'win' of session s-1 is gone"):
        replay_(p, "s-1")


def test_replay_node_choice() -> None:
    def beat(node: str, alive: bool = True, load: int = 0) -> dict[str, object]:
        return {"service": "stream", "node": node, "alive": alive, "load": load,
                "nbd": f"{node}:1", "http_stream": f"http://{node}:2"}  # fmt: skip

    beats = [beat("a", load=3), beat("b", load=1), beat("c", alive=False)]
    choose = sessions.choose_replay_node
    assert choose(beats, "a", ["b"]).node == "a"  # asked for
    assert choose(beats, None, ["c", "a"]).node == "a"  # the first used one still alive
    assert choose(beats, None, ["c"]).node == "b"  # else the least loaded
    with pytest.raises(
        DomainError, match=r"stream node 'c' is not alive \(alive stream nodes: a, b\)"
    ):
        choose(beats, "c", [])
    with pytest.raises(DomainError, match="no stream node is alive") as e:
        choose(beats[2:], None, ["c"])
    assert e.value.kind == "refused"


def test_kernel_args_are_plain_words_and_cleared_by_empty() -> None:
    p = Projection()
    mac = device(p, "52:54:00:00:00:31", kernel_args="console=ttyS0,115200n8   quiet")
    assert p.devices[mac]["kernel_args"] == "console=ttyS0,115200n8 quiet"
    for bad in ("a;reboot", "x=$(id)", "init=/bin/sh'", "streamboot.nonce=x", "a`b"):
        with pytest.raises(DomainError, match="kernel argument"):
            devices.update(p, mac, kernel_args=bad)
    apply(p, devices.update(p, mac, kernel_args=""))
    assert p.devices[mac]["kernel_args"] is None


def test_how_a_version_boots_follows_what_was_found_and_the_policy() -> None:
    p = Projection()
    found = {"kernel_version": "6.1.0-12-amd64", "root": "UUID=ab", "kernels": ["6.1.0-12-amd64"]}
    apply(p, vdisks.publish(
        p, "deb", version=1, stage=None, path="deb/v1.raw", size=1 << 20, checksum="sha256:x",
        changed_blocks=1, block_size=65536, boot=found,
    ))  # fmt: skip
    apply(p, vdisks.publish(
        p, "deb", version=2, stage="production", path="deb/v2.map", size=1 << 20,
        checksum="sha256:y", changed_blocks=1, block_size=65536,
        boot={"problem": "no vmlinuz-VERSION in /boot or / of any filesystem"},
    ))  # fmt: skip
    vd = p.vdisks["deb"]
    assert vdisks.boot_plan(vd, 1) == {
        "method": "kernel", "kernel_version": "6.1.0-12-amd64", "root": "UUID=ab",
    }  # fmt: skip
    assert vdisks.boot_plan(vd, 2)["method"] == "sanboot"
    assert "no vmlinuz" in vdisks.boot_plan(vd, 2)["reason"]
    apply(p, vdisks.set_policy(p, "deb", boot_method="kernel"))
    with pytest.raises(DomainError, match="must boot kernel-direct"):
        vdisks.boot_plan(vd, 2)
    mac = device(p, "52:54:00:00:00:32")
    apply(p, assignments.assign(p, "device", mac, "deb", default=True))
    with pytest.raises(DomainError, match="must boot kernel-direct"):
        sessions.open_session(p, mac=mac, session_id="s", token_hash="h", node=NODE)
    apply(p, vdisks.set_policy(p, "deb", boot_method="sanboot", kernel="6.1.0-9-amd64"))
    assert vdisks.boot_plan(vd, 1)["method"] == "sanboot" and vd["kernel"] == "6.1.0-9-amd64"
    with pytest.raises(DomainError, match="boot method"):
        vdisks.set_policy(p, "deb", boot_method="pxe")


def test_merge_maps_later_versions_onto_the_base_and_retires_earlier_ones() -> None:
    p = Projection()
    with_vdisk(p, versions=4)
    for v in (2, 3):
        apply(p, vdisks.promote(p, "win", v, "production"))
    with pytest.raises(DomainError, match="would retire production version 3"):
        vdisks.merge_target(p, "win", 4)
    with pytest.raises(DomainError, match="nothing to merge"):
        vdisks.merge_target(p, "win", 1)
    with pytest.raises(DomainError, match="not the version's"):
        vdisks.merge(p, "win", 3, "win/v3.base.raw", "sha256:other")
    [merged] = vdisks.merge(p, "win", 3, "win/v3.base.raw", "sha256:x")
    assert merged.layers == {"3": ["win/v3.base.raw"], "4": ["win/v3.base.raw", "win/v4"]}
    assert merged.retired == [1, 2] and merged.superseded == ["win/v1", "win/v2", "win/v3"]
    apply(p, [merged])
    assert vdisks.chain(p.vdisks["win"], 4) == ["win/v3.base.raw", "win/v4"]
    with pytest.raises(DomainError, match="merged into a later version's base"):
        vdisks.rollback(p, "win")
    # The next version stacks on the base.
    apply(p, vdisks.publish(p, "win", version=5, stage=None, path="win/v5", size=1 << 20,
                            checksum="sha256:y", changed_blocks=1, block_size=65536))  # fmt: skip
    assert vdisks.chain(p.vdisks["win"], 5) == ["win/v3.base.raw", "win/v4", "win/v5"]


def test_a_merge_event_naming_files_outside_the_vdisk_is_skipped() -> None:
    p = Projection()
    with_vdisk(p, versions=2)
    forged = envelope(
        VdiskChainMerged(
            name="win", upto=2, base="../../etc/shadow", checksum="sha256:x",
            layers={"2": ["../../etc/shadow"]}, retired=[1], superseded=["win/v1"],
        )
    )  # fmt: skip
    p.apply(forged.type, forged.data, next(_positions), 1000.0)
    assert p.failures and vdisks.chain(p.vdisks["win"], 2) == ["win/v1", "win/v2"]
    assert not p.vdisks["win"]["versions"][1]["retired"]


def test_a_device_in_maintenance_maintains_its_default_vdisk_only() -> None:
    p = Projection()
    with_vdisk(p, "win", versions=2)
    with_vdisk(p, "rescue")
    mac = device(p, "52:54:00:00:00:31")
    with pytest.raises(DomainError, match="no vdisk assigned to maintain"):
        devices.set_maintenance(p, mac, True, None)
    for name in ("win", "rescue"):
        apply(p, assignments.assign(p, "device", mac, name, default=name == "win"))
    apply(p, devices.set_maintenance(p, mac, True, "win"))
    assert devices.set_maintenance(p, mac, True, "win") == []  # already on: nothing recorded
    [other] = open_(p, mac, "s-r", vdisk="rescue")
    assert not other.maintenance  # type: ignore[attr-defined]
    [opened] = open_(p, mac, "s-w")
    assert opened.maintenance and opened.version == 2 and not opened.read_only  # type: ignore[attr-defined]
    apply(p, devices.set_maintenance(p, mac, False, "win"))
    [plain] = open_(p, mac, "s-p")
    assert not plain.maintenance and plain.version == 1  # type: ignore[attr-defined]


def test_a_policy_that_keeps_writes_must_be_able_to_keep_them() -> None:
    p = Projection()
    with_vdisk(p)
    apply(p, vdisks.set_policy(p, "win", write_cache="client-ram"))  # discard: fine
    for change, said in [
        ({"write_cache_persistence": "keep"}, "persistence keep"),
        ({"mode": "private"}, "a private vdisk"),
    ]:
        with pytest.raises(DomainError, match=rf"client-ram write cache cannot keep.*{said}"):
            vdisks.set_policy(p, "win", **change)  # type: ignore[arg-type]
    apply(p, vdisks.set_policy(p, "win", write_cache="client-disk", write_cache_persistence="keep"))
    apply(p, vdisks.set_policy(p, "win", mode="private"))
    # A private vdisk with client-disk: its one device keeps its local write cache.
    mac = device(p, "52:54:00:00:00:0a")
    apply(p, assignments.assign(p, "device", mac, "win", default=True))
    [opened] = open_(p, mac, "s-9")
    assert (opened.write_cache, opened.write_cache_persistence) == ("client-disk", "keep")  # type: ignore[attr-defined]
    with pytest.raises(DomainError, match="use client-disk"):
        vdisks.set_policy(p, "win", write_cache="client-ram")
    # Both at once, to something that keeps nothing: fine.
    apply(p, vdisks.set_policy(p, "win", write_cache="client-ram", mode="standard",
                               write_cache_persistence="discard"))  # fmt: skip
    with pytest.raises(DomainError, match="cannot keep"):
        vdisks.publish(
            p, "other", version=1, stage=None, path="other/v1", size=1 << 20,
            checksum="sha256:x", changed_blocks=1, block_size=65536,
            write_cache="client-ram", write_cache_persistence="keep",
        )  # fmt: skip


def test_iscsi_ibft_boots_kernel_direct_only_with_a_server_side_write_cache() -> None:
    p = Projection()
    with_vdisk(p)
    with pytest.raises(DomainError, match=r"iscsi-ibft .* cannot use a client-ram write cache"):
        vdisks.set_policy(p, "win", boot_method="iscsi-ibft", write_cache="client-ram")
    apply(p, vdisks.set_policy(p, "win", boot_method="iscsi-ibft"))
    with pytest.raises(DomainError, match=r"iscsi-ibft .* cannot use a client-disk write cache"):
        vdisks.set_policy(p, "win", write_cache="client-disk")
    with pytest.raises(DomainError, match="must boot kernel-direct but cannot"):
        vdisks.boot_plan(p.vdisks["win"], 1)
    p.vdisks["win"]["versions"][1]["boot"] = {"kernel_version": "6.1.0-1-amd64", "root": "UUID=x"}
    assert vdisks.boot_plan(p.vdisks["win"], 1) == {
        "method": "iscsi-ibft", "kernel_version": "6.1.0-1-amd64", "root": "UUID=x",
    }  # fmt: skip


def test_nbdroot_boots_only_with_a_server_side_write_cache() -> None:
    p = Projection()
    with_vdisk(p)
    apply(p, vdisks.set_policy(p, "win", boot_method="nbdroot"))
    with pytest.raises(DomainError, match=r"nbdroot .* cannot use a client-disk write cache"):
        vdisks.set_policy(p, "win", write_cache="client-disk")
    apply(p, vdisks.set_policy(p, "win", boot_method="auto", write_cache="client-disk"))
    with pytest.raises(DomainError, match="only server-ram or server-disk"):
        vdisks.set_policy(p, "win", boot_method="nbdroot")
    # Without boot files it cannot boot kernel-direct at all: said on the client's screen.
    apply(p, vdisks.set_policy(p, "win", boot_method="nbdroot", write_cache="server-ram"))
    with pytest.raises(DomainError, match="must boot kernel-direct but cannot"):
        vdisks.boot_plan(p.vdisks["win"], 1)


def test_an_initramfs_without_the_client_is_refused_on_the_clients_screen() -> None:
    """Kernel-direct would stop inside an initramfs that cannot attach the streamed root:
    the session does not open, and the message (iPXE shows it) names what is missing."""
    p = Projection()
    for version, client in ((1, "none"), (2, "nbdroot"), (3, "streamboot"), (4, None)):
        found = {"kernel_version": "6.1.0-12-amd64", "root": "UUID=ab",
                 "kernels": ["6.1.0-12-amd64"], "initramfs_client": client}  # fmt: skip
        apply(p, vdisks.publish(
            p, "deb", version=version, stage="production" if version == 1 else None,
            path=f"deb/v{version}.map", size=1 << 20,
            checksum=f"sha256:{version}", changed_blocks=1, block_size=65536, boot=found,
        ))  # fmt: skip
    vd = p.vdisks["deb"]
    with pytest.raises(DomainError, match="has no streamboot client; install streamboot-client"):
        vdisks.boot_plan(vd, 1)
    with pytest.raises(DomainError, match=r"only Debian's NBD root.*--boot-method nbdroot"):
        vdisks.boot_plan(vd, 2)
    assert vdisks.boot_plan(vd, 3)["method"] == "kernel"
    assert vdisks.boot_plan(vd, 4)["method"] == "kernel"  # not read: booted as before
    mac = device(p, "52:54:00:00:00:33")
    apply(p, assignments.assign(p, "device", mac, "deb", default=True))
    with pytest.raises(DomainError, match="no streamboot client"):
        sessions.open_session(p, mac=mac, session_id="s", token_hash="h", node=NODE)
    # The operator's way out: the image's own NBD root, or its own boot loader.
    apply(p, vdisks.set_policy(p, "deb", boot_method="nbdroot"))
    assert vdisks.boot_plan(vd, 2)["method"] == "nbdroot"
    apply(p, vdisks.set_policy(p, "deb", boot_method="sanboot"))
    assert vdisks.boot_plan(vd, 1)["method"] == "sanboot"


def test_a_stored_row_that_does_not_fit_its_model_is_skipped_not_applied() -> None:
    """Replay parses each row into its catalog model: a row whose field has the wrong type
    (a hostname that is a number, a tester flag that is a word) is skipped and kept as a
    failure, and the fold goes on with the next row."""
    p = Projection()
    good = '{"mac": "52:54:00:00:00:41", "machine_id": "m-41", "hostname": "lab-41"}'
    bad = '{"mac": "52:54:00:00:00:42", "machine_id": "m-42", "hostname": 42, "tester": "yes"}'
    at = next(_positions)
    p.apply_records(
        [
            (at, "DeviceRegistered", bad, 1000.0, "device-52:54:00:00:00:42"),
            (at + 1, "DeviceRegistered", good, 1000.0, "device-52:54:00:00:00:41"),
        ]
    )
    assert set(p.devices) == {"52:54:00:00:00:41"} and p.position == at + 1
    assert list(p.failures) == [at] and "ValidationError" in p.failures[at]["error"]
    # The live path (a dict offered by the follower) checks the same way.
    p.apply("DeviceRegistered", {"mac": "52:54:00:00:00:43", "machine_id": 7}, at + 2)
    assert "52:54:00:00:00:43" not in p.devices and at + 2 in p.failures
