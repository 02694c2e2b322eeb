"""A throw-away process for the crash tests: append events and/or relay them, maybe dying."""

from __future__ import annotations

import asyncio
import sys

import nats

from shared.bus import ensure_event_stream
from shared.envelope import Envelope
from shared.event_store import EventStore
from shared.relay import EventRelay


async def main(nats_url: str, database_url: str, append: int, relay: bool) -> None:
    store = await EventStore.connect(database_url)
    if append:
        stored = await store.append(
            [
                Envelope(type="CrashTested", stream_id="crash-1", data={"n": i})
                for i in range(append)
            ]
        )
        print("appended", stored[-1].position, flush=True)
    if relay:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_event_stream(js)
        await EventRelay(store, js).publish_pending()
        print("relayed", flush=True)
        await nc.close()
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "relay"))
