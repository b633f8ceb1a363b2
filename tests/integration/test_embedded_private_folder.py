"""The embedded PostgreSQL starts when its binaries lie in a private folder.

As root the server runs as the unprivileged `pgserver` user, which must traverse every folder
above both its data and its binaries. A checkout cloned into a folder `mktemp -d` made (mode
0700) holds the virtualenv, and so the binaries: on a new machine, `make test` there failed
every test that starts a server of its own with "Permission denied: …/initdb".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from payment_service.embedded import EmbeddedPostgres

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only as root does the server run as another user"
)


def test_binaries_in_a_private_folder_are_made_reachable() -> None:
    private = Path(tempfile.mkdtemp(prefix="payments-private-"))  # mode 0700, as mktemp -d
    server: EmbeddedPostgres | None = None
    try:
        server = EmbeddedPostgres(private / "pgdata")
        # The pgserver package as installed: its binaries find their libraries beside the package
        # (RPATH $ORIGIN/../../../pgserver.libs).
        package = server.bin_dir.parent.parent
        site = private / "site-packages"
        shutil.copytree(package / "pginstall", site / "pgserver" / "pginstall", symlinks=True)
        shutil.copytree(package.parent / "pgserver.libs", site / "pgserver.libs", symlinks=True)
        site.chmod(0o700)
        server.bin_dir = site / "pgserver" / "pginstall" / "bin"
        server.start()
        assert server.psql("SELECT 1").strip() == "1"
    finally:
        if server is not None:
            server.stop(mode="immediate")
        shutil.rmtree(private, ignore_errors=True)
