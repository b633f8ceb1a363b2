"""The operational routes: /health (the database answers), /health/live and /metrics."""

from __future__ import annotations

import logging
from typing import Any

from quart import Response
from quart_schema import document_response, hide

from app.context import PaymentApp
from app.models import DatabaseNode, Health, Liveness
from payment_service import SERVICE_NAME, __version__
from payment_service.database import STANDBY_SQL

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_SECONDS = 2.0


def install_operational_routes(app: PaymentApp) -> None:
    @app.get("/health")
    @document_response(Health, 200)
    @document_response(Health, 503)
    async def health() -> tuple[dict[str, Any], int]:
        database = "ok"
        node = None
        try:
            async with app.connection() as conn:
                standby = await conn.fetchval(STANDBY_SQL, timeout=HEALTH_TIMEOUT_SECONDS)
            node = DatabaseNode(role="standby" if standby else "primary")
        except Exception as error:  # any failure to answer is "unhealthy"
            logger.warning("health check failed", extra={"error": type(error).__name__})
            database = "unavailable"
        document = Health(
            status="healthy" if database == "ok" else "unhealthy",
            service=SERVICE_NAME,
            version=__version__,
            checks={"database": database},
            database=node,
        )
        return document.model_dump(), 200 if database == "ok" else 503

    @app.get("/health/live")
    @document_response(Liveness, 200)
    async def live() -> dict[str, str]:
        return {"status": "alive", "service": SERVICE_NAME}

    @app.get("/metrics")
    @hide
    async def metrics() -> Response:
        return Response(app.metrics.render(), content_type=app.metrics.content_type)
