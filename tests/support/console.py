"""The operator console over plain HTTP in the tests: a client that signs in with an admin key,
reads the CSRF token from a page's form and posts forms as a browser would (the browser tests
drive a real Chromium: tests/support/browser.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx

CONSOLE = "/admin/console"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class ConsoleClient:
    """An httpx client of one console session (its cookie jar); redirects are not followed, so
    a test sees each answer."""

    def __init__(self, client: httpx.AsyncClient, prefix: str = "") -> None:
        self.client = client
        self.root = prefix + CONSOLE

    async def sign_in(self, token: str) -> httpx.Response:
        return await self.client.post(self.root + "/sign-in", data={"token": token})

    async def get(self, path: str, **params: str) -> httpx.Response:
        """GET the page at `path` (which may carry its own query, unless `params` are given)."""
        return await self.client.get(self.root + path, params=params or None)

    async def csrf(self, path: str = "/") -> str:
        """The CSRF token of the forms on the page at `path`."""
        page = await self.get(path)
        assert page.status_code == 200, (path, page.status_code, page.text[:500])
        found = _CSRF.search(page.text)
        assert found is not None, page.text[:2000]
        return found.group(1)

    async def post(self, path: str, **form: str) -> httpx.Response:
        return await self.client.post(self.root + path, data=form)

    async def act(self, path: str, **form: str) -> httpx.Response:
        """Confirm an action as its confirmation page does: GET it, post its form with the
        session's CSRF token."""
        return await self.post(path, csrf=await self.csrf(path), **form)


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def page_text(html: str) -> str:
    """What a page shows as text (entities decoded, markup gone), whitespace collapsed."""
    parser = _Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split())


def script_elements(html: str) -> int:
    """How many <script> elements a page really has (escaped text is not one)."""
    return len(re.findall(r"<script\b", html, re.IGNORECASE))
