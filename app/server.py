"""`payment-service serve`: the API under Uvicorn (the default) or Hypercorn, in one or more worker
processes. Uvicorn is the default because it measured faster (README, docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

from hypercorn.config import Config
from hypercorn.run import run

from app.metrics import multiprocess_directory
from payment_service.config import Settings

logger = logging.getLogger(__name__)

GRACEFUL_TIMEOUT_SECONDS = 10
KEEP_ALIVE_SECONDS = 75


def hypercorn_config(settings: Settings, *, host: str, port: int, workers: int) -> Config:
    config = Config()
    config.application_path = "app.asgi:build()"
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # One process serves in place; more are spawned by Hypercorn and share the socket.
    config.workers = 0 if workers <= 1 else workers
    config.worker_class = "uvloop" if _has_uvloop() else "asyncio"
    config.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.backlog = 2048
    config.accesslog = None  # the app writes its own JSON access log
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def serve(
    settings: Settings, *, host: str, port: int | None, workers: int, server: str = "uvicorn"
) -> int:
    port = port or settings.service_port
    if workers < 1:
        raise SystemExit("payment-service serve: --workers must be at least 1")
    # Workers are separate processes that read their settings from the environment again.
    os.environ.setdefault("SERVICE_PORT", str(port))
    logger.info("serving", extra={"host": host, "port": port, "workers": workers, "server": server})
    # Every worker's counters in each scrape (app/metrics.py); the directory is set before a
    # worker starts, and a worker imports prometheus_client only when it loads the app.
    with multiprocess_directory():
        if server == "hypercorn":
            return run(hypercorn_config(settings, host=host, port=port, workers=workers))
        return _serve_uvicorn(host=host, port=port, workers=workers)


def _serve_uvicorn(*, host: str, port: int, workers: int) -> int:
    """The app under Uvicorn (httptools parser, uvloop): less CPU per request than Hypercorn's
    pure-Python h11 on the hot path (docs/benchmarks.md), so it is the default."""
    import uvicorn

    with _stopped_by_signal_is_success():
        uvicorn.run(
            "app.asgi:build",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop" if _has_uvloop() else "asyncio",
            http="httptools",
            log_config=None,  # keep our JSON logging
            access_log=False,  # the app writes its own JSON access log
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=GRACEFUL_TIMEOUT_SECONDS,
            backlog=2048,
            lifespan="on",
        )
    return 0


@contextlib.contextmanager
def _stopped_by_signal_is_success() -> Iterator[None]:
    """A graceful stop on SIGTERM/SIGINT is a clean exit (0), as under Hypercorn.

    After its graceful shutdown Uvicorn raises the signal it caught again, to the handler that was
    in place before it ran: here one that does nothing, instead of dying by the signal.
    """
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: object) -> None:
    """Uvicorn's re-raised signal, after it has stopped gracefully."""
