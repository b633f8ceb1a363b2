"""The embedded PostgreSQL keeps its port across restarts, so a DATABASE_URL that someone saved
(the one `payment-service run` prints) keeps working; a port taken meanwhile is given up for a
free one, which is then the port it keeps."""

from __future__ import annotations

import socket

from payment_service.embedded import EmbeddedPostgres, free_port
from tests.support.database import scratch_dir


def test_the_port_is_kept_across_restarts_and_moves_only_when_taken() -> None:
    with scratch_dir("payments-embedded-port-") as scratch:
        preferred = free_port()
        server = EmbeddedPostgres(scratch / "pgdata", preferred_port=preferred)
        try:
            server.start()
            assert server.port == preferred
            server.stop()

            # A new object on the same data, preferring another port: the one it had wins.
            again = EmbeddedPostgres(scratch / "pgdata", preferred_port=free_port())
            again.start()
            assert again.port == preferred
            assert again.psql("SELECT 1").strip() == "1"
            again.stop()

            with socket.socket() as taken:
                taken.bind(("127.0.0.1", preferred))
                taken.listen(1)
                moved = EmbeddedPostgres(scratch / "pgdata", preferred_port=preferred)
                moved.start()
                assert moved.port not in (None, preferred)
                moved.stop()

            # From then on it keeps the new port, though the old one is free again.
            last = EmbeddedPostgres(scratch / "pgdata", preferred_port=preferred)
            last.start()
            assert last.port == moved.port
        finally:
            EmbeddedPostgres(scratch / "pgdata").stop(mode="immediate")
