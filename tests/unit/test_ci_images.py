"""`.ci/images/build.sh --print-mirror`: the Debian mirror comes from this machine's apt sources
(one-line and deb822, in apt's order), never from a host written in the script; none is an error."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

BUILD_SH = Path(__file__).resolve().parents[2] / ".ci" / "images" / "build.sh"


def print_mirror(apt_etc: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DEBIAN_MIRROR"}
    return subprocess.run(
        ["bash", str(BUILD_SH), "--print-mirror"],
        env={**environment, "APT_ETC": str(apt_etc), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def apt_etc(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    return tmp_path


def test_deb822_picks_the_first_enabled_deb_stanza_for_the_suite(apt_etc: Path) -> None:
    (apt_etc / "sources.list.d" / "debian.sources").write_text(
        "# comment\n"
        "Types: deb\nURIs: http://security.mirror.test/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.mirror.test/debian\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.mirror.test/debian\nSuites: bookworm\n\n"
        "Types: deb deb-src\nURIs: mirror+file:///etc/list https://main.mirror.test/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    result = print_mirror(apt_etc)
    assert (result.returncode, result.stdout) == (0, "https://main.mirror.test/debian\n")


def test_one_line_sources_with_options_and_apt_order(apt_etc: Path) -> None:
    (apt_etc / "sources.list").write_text(
        "# deb http://commented.mirror.test/debian bookworm main\n"
        "deb-src http://src.mirror.test/debian bookworm main\n"
        "deb http://other.mirror.test/ubuntu jammy main\n"
    )
    (apt_etc / "sources.list.d" / "a.list").write_text(
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://list.mirror.test/debian "
        "bookworm main\n"
    )
    (apt_etc / "sources.list.d" / "b.sources").write_text(
        "Types: deb\nURIs: http://later.mirror.test/debian\nSuites: bookworm\n"
    )
    result = print_mirror(apt_etc)
    assert (result.returncode, result.stdout) == (0, "http://list.mirror.test/debian\n")


def test_no_source_for_the_suite_fails_and_says_what_to_do(apt_etc: Path) -> None:
    (apt_etc / "sources.list").write_text("deb http://other.mirror.test/ubuntu jammy main\n")
    result = print_mirror(apt_etc)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "no apt source for Debian bookworm" in result.stderr
    assert "DEBIAN_MIRROR" in result.stderr


def test_debian_mirror_overrides_apt(apt_etc: Path) -> None:
    result = print_mirror(apt_etc, DEBIAN_MIRROR="http://chosen.mirror.test/debian")
    assert (result.returncode, result.stdout) == (0, "http://chosen.mirror.test/debian\n")


def test_the_script_names_no_mirror_host() -> None:
    script = BUILD_SH.read_text(encoding="utf-8")
    assert re.findall(r"[a-z+]+://[\w.-]+\.[a-z]{2,}", script) == []
