"""Migration 0008 (several previous secrets) on a database in use: an endpoint's previous secret
that still signs keeps signing until the same time, one that expired is not brought back, and the
next rotation keeps both the current and the upgraded previous secret signing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from payment_service import endpoints
from payment_service.migrations import migrate
from tests.migrations.conftest import migrated_before
from tests.support.audit import OPERATOR
from tests.support.environment import new_signing_secret

SECRETS_VERSION = 8


@pytest.fixture
async def before_0008(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    async with migrated_before(empty_database_url, SECRETS_VERSION) as conn:
        yield conn


async def test_a_previous_secret_still_signing_keeps_signing_after_the_upgrade(
    before_0008: asyncpg.Connection,
) -> None:
    conn = before_0008
    current, previous, expired, other = (new_signing_secret() for _ in range(4))
    # As `rotate-secret` of the previous version left them: `trip` rotated an hour ago, `driver`
    # two days ago, `rider` never.
    expires_at = await conn.fetchval(
        """
        INSERT INTO endpoints (name, url, secret, previous_secret, previous_secret_expires_at)
        VALUES ('trip', 'http://127.0.0.1:9/t', $1, $2, now() + interval '23 hours'),
               ('driver', 'http://127.0.0.1:9/d', $3, $4, now() - interval '1 day'),
               ('rider', 'http://127.0.0.1:9/r', $3, NULL, NULL)
        RETURNING previous_secret_expires_at
        """,
        current,
        previous,
        other,
        expired,
    )

    await migrate(conn)

    trip = await endpoints.select_endpoint(conn, "trip")
    assert trip.signing_secrets() == [current, previous]
    assert [p.expires_at for p in trip.previous_secrets] == [expires_at]
    for name in ("driver", "rider"):
        assert (await endpoints.select_endpoint(conn, name)).signing_secrets() == [other]

    # the first rotation after the upgrade keeps both earlier secrets signing
    rotated = await endpoints.rotate_secret(conn, "trip", operator=OPERATOR)
    assert rotated.signing_secrets() == [rotated.secret, current, previous]
