"""The events the cache service follows: block accesses and boots feed the boot profiles
(queue group: once), and SessionClosed drops the session's ``discard`` write cache on the
node holding it (a durable consumer per node). Part of the cache service (service.py wires
it); BootRequested is the prefetcher's (prefetch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.cache.boot_profiles import BootProfiles
from services.cache.placement import Owners
from services.cache.write_cache import WriteCaches
from shared.bus import EVENTS_STREAM, BusError, subject_token
from shared.errors import reason
from shared.event_log import closed_in_log
from shared.events import BlocksRequested, ClientBooted, SessionClosed, received, subject_of
from shared.service import ServiceRuntime

log = logging.getLogger("streamboot.cache")

# A cache node's consumer of SessionClosed outlives its node's absence this long.
CLOSED_CONSUMER_KEEP_S = 30 * 24 * 3600.0
# How long one pull for SessionClosed waits (an idle node asks again after it).
CLOSED_FETCH_WAIT_S = 2.0
# A close the registry cannot confirm (it is away) comes back after this.
CLOSED_RETRY_S = 2.0


class EventFollowers:
    def __init__(
        self, rt: ServiceRuntime, profiles: BootProfiles, writes: WriteCaches, owners: Owners
    ) -> None:
        self.rt = rt
        self.node = rt.settings.node_id
        self.profiles = profiles
        self.writes = writes
        self.owners = owners

    async def on_blocks(self, msg: Msg) -> None:
        event = received(msg, BlocksRequested)
        if event is not None:
            self.profiles.observe(event)

    async def on_client_booted(self, msg: Msg) -> None:
        event = received(msg, ClientBooted)
        if event is not None:
            self.profiles.booted(event.session_id)

    async def on_session_closed(self, msg: Msg) -> None:
        """Queue group (once): the session's boot, if it was being learnt, ends."""
        event = received(msg, SessionClosed)
        if event is not None:
            self.profiles.end_boot(event.session_id)

    async def follow_closed_sessions(self) -> None:
        """Drop the ``discard`` caches of closed sessions, also of those closed while this
        node was down: a durable JetStream consumer per node resumes where it stopped (a
        core subscription would miss them, and the caches would stay for good)."""
        durable = f"cache-closed-{subject_token(self.node)}"
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.NEW,  # at creation; then from where it stopped
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=CLOSED_CONSUMER_KEEP_S,  # a node gone for good lets go
        )
        # Checked each turn, not only cancellation: a cancel that lands as nats-py's fetch
        # times out can be lost, and the service would then not stop.
        stopping = self.rt.stopping
        while not stopping.is_set():
            try:
                sub = await self.rt.js.pull_subscribe(
                    subject_of(SessionClosed), durable=durable, stream=EVENTS_STREAM, config=config
                )
                try:
                    while not stopping.is_set():
                        try:
                            msgs = await sub.fetch(64, timeout=CLOSED_FETCH_WAIT_S)
                        except NatsTimeoutError:
                            continue
                        for msg in msgs:
                            try:
                                await self.drop_closed_session(msg)
                            except BusError as e:  # the registry cannot confirm it now
                                log.warning("cache: a close not confirmed yet (%s)", reason(e))
                                await msg.nak(delay=CLOSED_RETRY_S)
                                continue
                            except Exception:  # a bad event must not come back forever
                                log.exception("cache: cannot handle a SessionClosed event")
                            await msg.ack()
                finally:
                    # nats-py's fetch takes the expiry notices of earlier fetches out of
                    # the inbox without marking them done: a subscription left open made
                    # the connection's drain at stop wait its whole timeout for them.
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cache: following closed sessions failed (%s); again in 1 s", reason(e))
                await asyncio.sleep(1.0)

    async def drop_closed_session(self, msg: Msg) -> None:
        """Every node: the one holding the session's ``discard`` cache drops it (and its
        owner record), once the registry confirms that the close is in the log (anyone
        may publish a message; raises BusError when it cannot tell now); the others hold
        nothing of it."""
        event = received(msg, SessionClosed)
        if event is None or not self.writes.discardable(event.session_id):
            return
        sid = event.session_id
        if not await closed_in_log(self.rt.nc, sid):
            log.warning("cache: a SessionClosed of %s that is not in the log; its cache kept", sid)
            return
        for key in self.writes.drop_session(sid):
            try:
                await self.owners.release(key)
            except Exception as e:
                log.warning(
                    "write cache %s dropped, but its owner record stays: %s", key, reason(e)
                )
