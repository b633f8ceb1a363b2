"""`python -m tests.support.screenshots` (or `make screenshots`): the console's pages as PNG files
in docs/console/, taken by the browser tests as they drive a real Chromium against real `serve`
and relay processes (tests/support/browser.py saves a page wherever a test asks for it).

It runs those tests with CONSOLE_SCREENSHOTS set to the folder; arguments after the command go to
pytest. The database is the tests' own (TEST_DATABASE_URL, a container or the embedded server).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.support import REPO_ROOT
from tests.support.browser import SCREENSHOTS_VARIABLE

FOLDER = REPO_ROOT / "docs" / "console"
TESTS = ["tests/e2e/test_console_browser.py"]


def main(argv: list[str]) -> int:
    os.environ[SCREENSHOTS_VARIABLE] = str(FOLDER)
    os.environ["REQUIRE_BROWSER"] = "1"  # no screenshots is a failure here, not a skip
    os.chdir(REPO_ROOT)
    code = int(pytest.main([*TESTS, "-q", "-p", "no:cacheprovider", *argv]))
    if code == 0:
        for path in sorted(FOLDER.glob("*.png")):
            print(path.relative_to(REPO_ROOT))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
