"""Running the service: load the model once, build the app, serve it with uvicorn, report jobs at shutdown.

`serve(config)` is what `rdm serve` calls; `start(config)` runs the same server in a thread on a
socket it binds first (port 0 picks a free one), for tests and notebooks.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import RDMError
from .access import read_keys
from .app import Guard, create_app
from .config import ServeConfig
from .engine import Engine

log = logging.getLogger("rdm.serve")


def with_session_key(config: ServeConfig) -> ServeConfig:
    """Without a keys file the service makes a key for this run (all scopes), as Jupyter does: the page's link
    carries it; nothing else can use the service unless collections are opened to anonymous callers."""
    if config.keys or config.session_key:
        return config
    return replace(config, session_key="rdm-" + secrets.token_urlsafe(32))


def page_link(config: ServeConfig, port: int | None = None) -> str:
    base = f"http://{config.host}:{config.port if port is None else port}/"
    return base + (f"#key={config.session_key}" if config.session_key else "")


def build_app(config: ServeConfig, pipe=None):
    """The ASGI app for a config (a loaded pipeline may be passed in, else the config's model is loaded)."""
    import torch

    from ..db.retrieval import DatabaseRegistry
    from ..sampling.generate import load_pipeline

    if config.keys:
        read_keys(config.keys)  # a bad keys file is reported before the model is loaded
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    pipe = pipe or load_pipeline(config.model, config.device, config.dtype, progress=False)
    pipe.set_progress_bar_config(disable=True)
    registry = DatabaseRegistry(config.indexes, list(config.databases) if config.databases is not None else None,
                                warm=True)
    app = create_app(Engine(pipe, registry, config), config)
    app.add_middleware(Guard, config=config)
    return app


class _Server(uvicorn.Server):
    """uvicorn, failing unfinished jobs as soon as a stop is asked for (so event streams end and report it)."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.rdm_app = app

    def handle_exit(self, sig, frame):
        self.rdm_app.state.queue.begin_shutdown()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT/SIGTERM stop the server gracefully (uvicorn's own re-raises the signal afterwards, which would
        kill the process before the jobs in flight are reported)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class _HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a connection's first request headers: a client that connects and
    sends nothing, or trickles its headers, is closed after `header_timeout_s` (uvicorn itself times out only idle
    keep-alive connections, so half-open ones stayed open for ever)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(exc)


def _uvicorn_config(app, config: ServeConfig, **extra) -> uvicorn.Config:
    protocol = type("HeaderDeadlineH11", (_HeaderDeadlineH11,), {"header_timeout_s": config.header_timeout_s})
    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5, lifespan="off", http=protocol,
                          timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections, **extra)


def check_binding(config: ServeConfig) -> None:
    if not config.binds_loopback() and not config.allow_network:
        raise RDMError(f"--host {config.host} would expose the service to a network; add --allow-network to open "
                       "generation and search to it (writes still need --token-file), or bind 127.0.0.1")


def serve(config: ServeConfig, pipe=None) -> None:
    """Load, bind and serve until interrupted; every job still unfinished then is reported failed."""
    check_binding(config)
    config = with_session_key(config)
    if not log.handlers:  # the service's own messages (job reports, takedowns) on stderr, not every library's
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("rdm serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    app = build_app(config, pipe)
    names = app.state.engine.registry.names()
    access = (f"keys from {config.keys}" if config.keys else "open the link above: it carries this run's key")
    if config.anonymous:
        access += f"; anonymous callers may use {', '.join(config.anonymous)}"
    print(f"rdm serve: {page_link(config)}\n  {len(names)} database(s): {', '.join(names) or 'none'}; {access}; "
          f"API at /docs, clip-retrieval at /knn-service", file=sys.stderr, flush=True)
    threading.Thread(target=_open_served, args=(app.state.engine.registry, names), daemon=True).start()
    server = _Server(_uvicorn_config(app, config), app)
    try:
        server.run()
    finally:
        app.state.queue.shutdown()


def _open_served(registry, names: list[str]) -> None:
    """Open every served database now, so that their files are read into the page cache before the first
    searches need them (rdm.db.warm); a database that cannot be opened is reported when it is asked for."""
    for name in names:
        try:
            registry.get(name)
        except RDMError:
            continue
        w = registry.warming.get(name)
        if w is not None:
            w.wait()
            log.info("database %s warmed in the page cache: %s", name, w.summary())


@dataclass
class Running:
    """A server running in a thread (tests, notebooks)."""

    url: str
    app: object
    server: _Server
    thread: threading.Thread
    key: str | None = None  # this run's key (None with a keys file)

    def stop(self, timeout: float = 15.0) -> list[tuple[str, str]]:
        self.app.state.queue.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(timeout)
        return self.app.state.queue.shutdown()


def start(config: ServeConfig, pipe=None, app=None) -> Running:
    """Serve in a background thread on config.host:config.port (0: a free port); returns once it answers."""
    check_binding(config)
    config = with_session_key(config) if app is None else config
    app = app or build_app(config, pipe)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    server = _Server(_uvicorn_config(app, config), app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="rdm-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RDMError("the server did not start")
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    return Running(f"http://{host}:{port}", app, server, thread, app.state.config.session_key)
