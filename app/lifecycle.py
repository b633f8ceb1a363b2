"""The API process's resources: the database pool and the outbox notifier open when the server
starts serving and close when it stops, and so does the gateway's HTTP client (it connects on its
first call). Nothing connects at import time or in `create_app`.
"""

from __future__ import annotations

import logging

from app.context import PaymentApp
from app.notifier import OutboxNotifier
from payment_service.database import UNAVAILABLE_ERRORS, create_pool, keep_session
from payment_service.logs import flush_logs
from payment_service.migrations import pending_check

logger = logging.getLogger(__name__)


def install_lifecycle(app: PaymentApp) -> None:
    @app.before_serving
    async def open_pool() -> None:
        settings = app.settings
        try:
            app._pool = await create_pool(
                settings.dsn(),
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                reset=keep_session,
            )
            async with app.connection() as conn:
                await pending_check(conn)
        except UNAVAILABLE_ERRORS as error:
            if app._pool is not None:
                app._pool.terminate()
            # Serve anyway: requests answer 503 until the database is back, and the pool
            # connects lazily then. The schema check is the migrate job's (compose runs it).
            logger.warning(
                "database unavailable at start; answering 503 until it is back",
                extra={"error": type(error).__name__},
            )
            app._pool = await create_pool(
                settings.dsn(), min_size=0, max_size=settings.db_pool_max, reset=keep_session
            )
        app._notifier = OutboxNotifier(app.pool)
        app._notifier.start()
        if not settings.callback_signing_secret:
            logger.warning("CALLBACK_SIGNING_SECRET is unset: callbacks will be unsigned")
        logger.info("API ready", extra={"api_prefix": settings.api_prefix or "/"})

    @app.after_serving
    async def close_pool() -> None:
        if app.charging is not None:
            await app.charging.gateway.close()
        if app._notifier is not None:
            await app._notifier.stop()
            app._notifier = None
        if app._pool is not None:
            await app._pool.close()
            app._pool = None
        # The access log is written by a thread (payment_service/logs.py): every request's line
        # is out before the server reports that it has stopped.
        flush_logs()
