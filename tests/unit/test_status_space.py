"""`streamboot status` names the live cache nodes short of space (their heartbeats' room)."""

from __future__ import annotations

from streamboot.commands.status import space_warnings


def beat(node: str, alive: bool, room: dict[str, bool], service: str = "cache") -> dict:
    free = {kind: (5 << 30 if ok else 100 << 20) for kind, ok in room.items()}
    return {"service": service, "node": node, "alive": alive, "room": room, "free_bytes": free}


def test_a_live_cache_node_short_of_space_is_named() -> None:
    lines = space_warnings(
        [
            beat("c1", True, {"server-disk": False, "server-ram": True}),
            beat("c2", True, {"server-disk": True, "server-ram": True}),
            beat("c3", False, {"server-disk": False}),  # gone: its heartbeat is old news
            beat("s1", True, {"server-disk": False}, service="stream"),
            {"service": "cache", "node": "old", "alive": True},  # a node not saying it
        ]
    )
    assert lines == [
        "cache on c1: short of space for server-disk write caches (100 MiB free); new ones "
        "go to other cache nodes while one has room"
    ]
