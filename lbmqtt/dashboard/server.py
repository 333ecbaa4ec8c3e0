"""The dashboard's web server: Bokeh embedded on the running loop, and the process around it.

BokehJS is served by the dashboard itself (no CDN: the LAN may have no internet), with
compressed responses.

The server is assembled from Bokeh's public parts (``BokehTornado`` + tornado
``HTTPServer`` + ``BaseServer``) rather than ``bokeh.server.server.Server``, because the
websocket origin allow-list must name the actually bound port, which ``Server`` only learns
after it has built the allow-list (``Server(address="127.0.0.1", port=0)`` only allows
``localhost:PORT``, so a browser on ``http://127.0.0.1:PORT/`` gets its websocket refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from typing import Final

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.document import Document
from bokeh.server.server import BaseServer
from bokeh.server.tornado import BokehTornado
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from ..config import Settings
from ..discovery import resolve as resolve_broker
from ..mqtt import MqttTransport
from ..protocol import DashboardStatus, Topics
from .page import make_document
from .state import DashboardState, dashboard_transport

log = logging.getLogger(__name__)

_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (compared, not bound)


def _url_host(ip: str) -> str:
    host = socket.gethostname() if ip in _WILDCARD_HOSTS else ip
    return f"[{host}]" if ":" in host else host


def _origins(ip: str, port: int) -> list[str]:
    """``host:port`` origins allowed to open the page's websocket."""
    hosts = {ip, "localhost", "127.0.0.1", _url_host(ip)}
    if ip in _WILDCARD_HOSTS:
        hosts |= {socket.getfqdn()}
        with contextlib.suppress(OSError):
            hosts |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    return sorted(
        {
            f"[{h}]:{port}" if ":" in h and not h.startswith("[") else f"{h}:{port}"
            for h in hosts
            if h not in _WILDCARD_HOSTS
        }
    )


class DashboardServer:
    """The Bokeh server of the dashboard, listening; build it with :func:`start_server`."""

    def __init__(self, server: BaseServer, http_server: HTTPServer, port: int, url: str):
        self._server = server
        self._http = http_server
        self.port = port
        self.url = url

    async def stop(self) -> None:
        """Stop listening, end the sessions and close the HTTP connections."""
        stop_async = getattr(self._server, "stop_async", None)
        if stop_async is not None:  # Bokeh >= 3.10
            await stop_async()
        else:  # Bokeh 3.9: stop() does not end the sessions
            self._server.stop()
            for session in self._server.get_sessions():
                if not session.destroyed and session.connection_count == 0:
                    session.destroy()
        await self._http.close_all_connections()


def _bind_sockets(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Listening sockets on every address of ``host``, all on one port (0: a free one).

    Like ``tornado.netutil.bind_sockets`` (what Bokeh's ``Server`` uses), except that a
    failed bind closes the sockets instead of leaking them.
    """
    socks: list[socket.socket] = []
    bound = port
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
            sock.bind((addr[0], bound, *addr[2:]))
            sock.listen(128)
            bound = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port}: {exc.strerror} (is another "
            f"dashboard running there? --monitor-port 0 picks a free "
            f"port)",
        ) from exc
    return socks, bound


def start_server(state: DashboardState, host: str = "127.0.0.1", port: int = 0) -> DashboardServer:
    """Start the dashboard's Bokeh server on the running loop; ``port`` 0 picks a free one.

    Raises:
        OSError: the address cannot be bound.
    """
    sockets, bound = _bind_sockets(host, port)
    url = f"http://{_url_host(host)}:{bound}/"
    try:

        def modify_doc(doc: Document) -> None:
            make_document(doc, state)

        app = Application(FunctionHandler(modify_doc))
        tornado_app = BokehTornado(
            {"/": app},
            absolute_url=url,
            extra_websocket_origins=_origins(host, bound),
            compress_response=True,
        )
        http_server = HTTPServer(tornado_app, xheaders=False)
        http_server.add_sockets(sockets)
    except Exception:
        for s in sockets:
            s.close()
        raise
    server = BaseServer(IOLoop.current(), tornado_app, http_server)
    server.start()
    return DashboardServer(server, http_server, bound, url)


async def serve(
    settings: Settings, *, ready_fd: int | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the dashboard until SIGINT/SIGTERM (or ``stop`` is set).

    Prints ``lbmqtt dashboard: http://HOST:PORT/`` and, with ``ready_fd``, writes one JSON
    line ``{"url": ..., "port": ...}`` to that file descriptor once listening (it is closed
    in any case, so a reader sees EOF if the dashboard fails to start). Connects to the
    broker in the background: the page says so until it is up.

    Raises:
        OSError: ``MONITOR_IP:MONITOR_PORT`` cannot be bound.
        LoginRefused: the broker refused the dashboard's login.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    topics = Topics(settings.topic_prefix)
    state = DashboardState(stale_after_s=max(5.0, 10 * settings.stats_interval_s))
    transport: MqttTransport | None = None
    try:
        server = start_server(state, settings.monitor_ip, settings.monitor_port)
        try:
            settings = await resolve_broker(settings)
            transport = dashboard_transport(settings, state, server.url)
            await transport.start()
            print(f"lbmqtt dashboard: {server.url}", flush=True)
            if ready_fd is not None:
                fd, ready_fd = ready_fd, None
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps({"url": server.url, "port": server.port}) + "\n")
            # until stopped, or the transport's loops die (a refused login): raise that
            watch = asyncio.ensure_future(transport.watch())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([watch, stopped], return_when=asyncio.FIRST_COMPLETED)
            for w in (watch, stopped):
                w.cancel()
            if watch.done() and not watch.cancelled():
                watch.result()
        finally:
            if transport is not None and transport.connected:
                await transport.publish_confirmed(
                    topics.dashboard_status,
                    DashboardStatus(online=False).encode(),
                    retain=True,
                    timeout_s=2.0,
                )
            state.close()
            await server.stop()
            if transport is not None:
                await transport.close()
            log.info("dashboard stopped")
    finally:
        if ready_fd is not None:  # failed before ready: the reader sees EOF
            os.close(ready_fd)
        for sig in handled:
            loop.remove_signal_handler(sig)
