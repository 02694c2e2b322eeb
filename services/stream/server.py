"""The stream node's data plane: NBD, HTTP range and iSCSI servers over one session manager.

Wiring (done by ``services/stream/service.py``)::

    servers = StreamServers(resolver, sink, StreamSettings.from_settings(settings))
    await servers.start()          # binds; servers.nbd_port / http_port / iscsi_port
    ...
    servers.close_session(session_id)   # the registry closed a session: drop its state
    await servers.stop()
"""

from __future__ import annotations

import asyncio
import logging

from services.stream.http_range import HttpConnection
from services.stream.iscsi.server import IscsiConnection
from services.stream.nbd.server import NbdConnection
from services.stream.rawtransport import raw_server
from services.stream.sessions import SessionManager
from services.stream.settings import StreamSettings
from services.stream.spec import EventSink, SessionResolver
from shared.listener import Listener, serve_protocol

log = logging.getLogger(__name__)


class StreamServers:
    def __init__(
        self, resolver: SessionResolver, sink: EventSink, settings: StreamSettings | None = None
    ) -> None:
        self.settings = settings or StreamSettings()
        self.sessions = SessionManager(resolver, sink, self.settings)
        # Own accept loops, not loop.create_server: out of file descriptors they refuse
        # connections and say so (shared/listener.py).
        self._servers: list[Listener] = []
        self.nbd_port = 0
        self.http_port = 0
        self.iscsi_port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        # The zero-copy transport sends large reads by sendfile (NBD and iSCSI alike);
        # STARTTLS needs uvloop's transports (loop.start_tls), and TLS bytes cannot be sent
        # from the page cache anyway.
        serve = raw_server if s.nbd_zero_copy else serve_protocol
        serve_nbd = raw_server if s.nbd_zero_copy and s.nbd_tls is None else serve_protocol
        nbd = serve_nbd(loop, lambda: NbdConnection(self.sessions), s.bind_host, s.nbd_port, "nbd")
        http = serve_protocol(
            loop, lambda: HttpConnection(self.sessions), s.bind_host, s.http_port, "http stream"
        )
        iscsi = serve(
            loop, lambda: IscsiConnection(self.sessions), s.bind_host, s.iscsi_port, "iscsi"
        )
        self._servers = [nbd, http, iscsi]
        if s.write_cache_dir is not None:
            s.write_cache_dir.mkdir(parents=True, exist_ok=True)
        self.sessions.spares.make_when_quiet()
        self.nbd_port = nbd.sockets[0].getsockname()[1]
        self.http_port = http.sockets[0].getsockname()[1]
        self.iscsi_port = iscsi.sockets[0].getsockname()[1]
        log.info("stream: nbd on %s:%d, http on %s:%d, iscsi on %s:%d", s.bind_host,
                 self.nbd_port, s.bind_host, self.http_port, s.bind_host, self.iscsi_port)  # fmt: skip

    def close_session(self, session_id: str) -> bool:
        """Drop a session (its connections and write cache); False if it is not here."""
        return self.sessions.close_session_id(session_id)

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for conn in list(self.sessions.connections):
            conn.abort("shutdown")
        # Let the connection_lost callbacks run (they emit the detach events).
        for _ in range(3):
            await asyncio.sleep(0)
        await self.sessions.close_all()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers = []
