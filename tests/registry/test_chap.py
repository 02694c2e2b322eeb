"""iSCSI CHAP credentials in the registry: set per device or per collection by the CLI (the
REST API), never shown by a view, never in the event log in clear, given in clear only to
the stream node's resolve and the boot service's session open over NATS."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from services.registry.app import RegistryApp
from services.registry.sealing import Sealer, SealingError
from shared.bus import request_json
from shared.event_store import EventStore
from shared.settings import Settings
from tests.registry.conftest import PATIENT, TOKEN, Registry, write_image

pytestmark = pytest.mark.timeout(180)
A = "52:54:00:00:00:0a"
B = "52:54:00:00:00:0b"
SECRET_A, SECRET_LAB, REVERSE = "secret-of-pc-a", "secret-of-the-lab", "the-targets-own"


async def _resolve(registry: Registry, token: str) -> dict:
    nc = await nats.connect(registry.bus.url_for("stream"))
    try:
        return await request_json(nc, "streamboot.registry.session.resolve", {"token": token})
    finally:
        await nc.close()


async def test_chap_per_device_and_per_collection(registry: Registry) -> None:
    img = write_image(registry.data_dir / "i.raw", 1 << 20, {})
    await registry.cli_json("vdisk", "import", str(img), "--name", "img")
    for mac in (A, B):
        await registry.cli_json("device", "add", mac, "--collection", "lab")
        await registry.cli_json("assign", mac, "img")

    d = await registry.cli_json(
        "device", "set", A, "--chap-user", "pc-a", "--chap-secret", SECRET_A,
        "--chap-reverse-user", "streamboot", "--chap-reverse-secret", REVERSE,
    )  # fmt: skip
    assert d["chap"] == {"user": "pc-a", "mutual": True, "reverse_user": "streamboot",
                         "source": "device"}  # fmt: skip
    code, out, err = await registry.cli(
        "collection", "set", "lab", "--chap-user", "lab", "--chap-secret", "-"
    )  # '-': the secret comes on stdin... here there is none: refused
    assert code == 1 and "12-64" in err
    c = await registry.cli_json("collection", "set", "lab", "--chap-user", "lab",
                                "--chap-secret", SECRET_LAB)  # fmt: skip
    assert c["chap"] == {"user": "lab", "mutual": False, "reverse_user": None}
    # A device's own credentials win; the collection's cover the others.
    assert (await registry.cli_json("device", "show", B))["chap"]["source"] == "collection"
    code, out, _ = await registry.cli("device", "show", A)
    assert code == 0 and "iSCSI CHAP   pc-a, mutual as streamboot" in out

    # The stream node gets them in clear in the resolve answer (its own NATS role)...
    s = await registry.cli_json("session", "open", A)
    assert "chap" not in s  # ...the REST answer never shows them
    chap = (await _resolve(registry, s["token"]))["chap"]
    assert chap == {"user": "pc-a", "secret": SECRET_A, "reverse_user": "streamboot",
                    "reverse_secret": REVERSE}  # fmt: skip
    # ...and so does the boot service, in its session open (for the iPXE script).
    nc = await nats.connect(registry.bus.url_for("boot"))
    try:
        opened = await request_json(nc, "streamboot.registry.session.open", {"mac": B})
    finally:
        await nc.close()
    assert opened["chap"] == {"user": "lab", "secret": SECRET_LAB, "reverse_user": None,
                              "reverse_secret": None}  # fmt: skip
    assert (await _resolve(registry, opened["token"]))["chap"]["secret"] == SECRET_LAB

    # Nothing in the log holds a secret in clear, the audit trail included.
    events = await registry.app.store.read_all()
    assert any(e.type == "IscsiChapChanged" for e in events)
    for e in events:
        text = str(e.data)
        assert all(x not in text for x in (SECRET_A, SECRET_LAB, REVERSE)), e.type

    # Cleared: the collection's apply to A again; then no CHAP at all.
    assert (await registry.cli_json("device", "set", A, "--no-chap"))["chap"]["user"] == "lab"
    assert (await registry.cli_json("collection", "set", "lab", "--no-chap"))["chap"] is None
    assert (await registry.cli_json("device", "show", B))["chap"] is None
    assert (await _resolve(registry, s["token"]))["chap"] is None

    # A rebuilt projection (the log replayed) agrees.
    await registry.cli_json("device", "set", B, "--chap-user", "b", "--chap-secret", SECRET_A)
    before = dict(registry.app.projection.chap)
    async with registry.http() as http:
        assert (await http.post("/registry/rebuild")).status_code == 200
    assert registry.app.projection.chap == before


async def test_bad_chap_settings_are_refused(registry: Registry) -> None:
    await registry.cli_json("device", "add", A)
    for args, why in (
        (["--chap-user", "u", "--chap-secret", "short"], "12-64"),
        (["--chap-user", "u u", "--chap-secret", SECRET_A], "invalid CHAP user"),
        (["--chap-secret", SECRET_A], "user"),
        (["--chap-user", "u", "--chap-secret", SECRET_A, "--chap-reverse-user", "t"], "both"),
        (["--chap-user", "u", "--chap-secret", SECRET_A, "--chap-reverse-user", "t",
          "--chap-reverse-secret", SECRET_A], "must differ"),
    ):  # fmt: skip
        code, _, err = await registry.cli("device", "set", A, *args)
        assert code == 1 and why in err, (args, err)
    code, _, err = await registry.cli("collection", "set", "no such", "--chap-user", "u",
                                      "--chap-secret", SECRET_A)  # fmt: skip
    assert code == 1 and "collection name" in err
    assert not [e for e in await registry.app.store.read_all() if e.type == "IscsiChapChanged"]


def test_a_sealed_secret_opens_only_with_its_key_and_owner() -> None:
    a, b = Sealer(bytes(32)), Sealer(bytes(range(32)))
    sealed = a.seal("secret-of-pc-a", "chap:device:x:secret")
    assert "secret-of-pc-a" not in sealed
    assert a.open(sealed, "chap:device:x:secret") == "secret-of-pc-a"
    for opener, context in ((b, "chap:device:x:secret"), (a, "chap:device:y:secret")):
        with pytest.raises(SealingError):
            opener.open(sealed, context)


def test_the_sealing_key_is_made_once_and_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.registry.sealing import load_sealer

    sealed = load_sealer(tmp_path, None).seal("secret-of-pc-a", "c")
    key = tmp_path / "secrets" / "sealing-key"
    assert key.stat().st_mode & 0o777 == 0o600 and list(key.parent.iterdir()) == [key]
    assert load_sealer(tmp_path, None).open(sealed, "c") == "secret-of-pc-a"
    with pytest.raises(SealingError):  # another key (the environment's wins)
        load_sealer(tmp_path, "A" * 43).open(sealed, "c")


def test_a_sealing_key_file_is_read_and_a_bad_one_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.registry.sealing import load_sealer

    key_file = tmp_path / "sealing_key"
    key_file.write_text("A" * 43 + "\n")  # as a compose secret or a Nomad template has it
    sealed = load_sealer(tmp_path / "dd", None, key_file).seal("secret-of-pc-a", "c")
    assert load_sealer(tmp_path / "other", "A" * 43).open(sealed, "c") == "secret-of-pc-a"
    assert not (tmp_path / "dd").exists()  # no key of its own made beside the given one
    # The environment's key wins over the file's.
    with pytest.raises(SealingError):
        load_sealer(tmp_path, "B" * 43, key_file).open(sealed, "c")
    # Given but unusable: a clear error naming it, never a key made up instead.
    for text in ("", "<no value>\n", "A" * 40):
        key_file.write_text(text)
        with pytest.raises(
            SealingError, match=r"STREAMBOOT_SEALING_KEY_FILE .* is not a sealing key"
        ):
            load_sealer(tmp_path / "dd", None, key_file)
    with pytest.raises(SealingError, match=r"STREAMBOOT_SEALING_KEY_FILE .*missing"):
        load_sealer(tmp_path / "dd", None, tmp_path / "missing")
    with pytest.raises(SealingError, match="STREAMBOOT_SEALING_KEY is not a sealing key"):
        load_sealer(tmp_path / "dd", "short", None)
    assert not (tmp_path / "dd").exists()


async def test_a_registry_given_an_unusable_key_file_does_not_start(
    store: EventStore, tmp_path: Path
) -> None:
    """A compose secret left unset reaches the registry as an empty file: it stops at
    start, saying so, rather than seal with a key of its own that no replica shares."""
    key_file = tmp_path / "sealing_key"
    key_file.write_text("")
    settings = Settings(data_dir=tmp_path / "dd", api_token=TOKEN, sealing_key_file=key_file,
                        **PATIENT)  # fmt: skip
    with pytest.raises(SealingError, match="STREAMBOOT_SEALING_KEY_FILE"):
        await RegistryApp(store, settings).start()
    key_file.write_text("A" * 43 + "\n")
    app = RegistryApp(store, settings)
    await app.start()
    assert app.sealer.open(Sealer(bytes(32)).seal("s3cret-of-a-pc", "c"), "c") == "s3cret-of-a-pc"
