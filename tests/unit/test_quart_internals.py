"""app/context.py drives parts of Quart that are not its public API: it replaces the HTTP
connection class (`ASGIHTTPConnection`, re-implementing its `__call__` to handle a request in the
server's task), the session interface and the request class. So pyproject.toml pins Quart to one
minor version, and these tests fail loudly when the installed Quart is another one or when a name,
signature or the re-implemented method changed: then re-read app/context.py against the new
Quart's quart/asgi.py, quart/sessions.py and quart/app.py, adapt it, and move the pin and the
expectations here together."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.asgi import ASGIHTTPConnection
from quart.sessions import NullSession, SecureCookieSessionInterface
from quart.wrappers import Request
from quart.wrappers.request import Body

from app.context import HandledInPlace, NoSessions, PaymentApp, PaymentRequest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
RECHECK = (
    "app/context.py relies on this part of Quart: re-read it against the installed Quart "
    "(quart/asgi.py, quart/sessions.py, quart/app.py), adapt it, then update the pin in "
    "pyproject.toml and the expectations in tests/unit/test_quart_internals.py together"
)

# What Quart's own ASGIHTTPConnection.__call__ does, which HandledInPlace.__call__ re-implements
# (one task fewer per request): when it changes, the re-implementation may miss the change.
QUART_HTTP_CALL = """
async def __call__(
    self, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    request = self._create_request_from_scope(send)
    receiver_task = asyncio.ensure_future(self.handle_messages(request, receive))
    handler_task = asyncio.ensure_future(self.handle_request(request, send))
    done, pending = await asyncio.wait(
        [handler_task, receiver_task], return_when=asyncio.FIRST_COMPLETED
    )
    await cancel_tasks(pending)
    raise_task_exceptions(done)
"""


def pinned_minor() -> tuple[int, int]:
    """The one minor version pyproject.toml allows Quart: `quart>=X.Y,<X.(Y+1)`."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if re.match(r"quart\s*[<>=]", d)]
    pin = re.fullmatch(r"quart\s*>=\s*(\d+)\.(\d+)(?:\.\d+)?\s*,\s*<\s*(\d+)\.(\d+)", spec)
    assert pin, f"pyproject.toml: Quart is not pinned to one minor version ({spec!r}): {RECHECK}"
    major, minor, below_major, below_minor = map(int, pin.groups())
    assert (below_major, below_minor) == (major, minor + 1), f"{spec!r} spans several minors"
    return major, minor


def test_the_installed_quart_is_the_pinned_minor() -> None:
    installed = importlib.metadata.version("quart")
    major, minor = pinned_minor()
    assert installed.split(".")[:2] == [str(major), str(minor)], (
        f"Quart {installed} is installed, pyproject.toml pins {major}.{minor}: {RECHECK}"
    )


@pytest.mark.parametrize(
    ("function", "parameters", "coroutine"),
    [
        (ASGIHTTPConnection.__init__, ["self", "app", "scope"], False),
        (ASGIHTTPConnection.__call__, ["self", "receive", "send"], True),
        (ASGIHTTPConnection._create_request_from_scope, ["self", "send"], False),
        (ASGIHTTPConnection.handle_messages, ["self", "request", "receive"], True),
        (ASGIHTTPConnection.handle_request, ["self", "request", "send"], True),
        (SecureCookieSessionInterface.open_session, ["self", "app", "request"], True),
        (SecureCookieSessionInterface.save_session, ["self", "app", "session", "response"], True),
        (SecureCookieSessionInterface.is_null_session, ["self", "instance"], False),
        (Quart.ensure_async, ["self", "func"], False),
    ],
    ids=lambda value: getattr(value, "__qualname__", None),
)
def test_what_app_context_calls_or_overrides_has_its_shape(
    function: Callable[..., Any], parameters: list[str], coroutine: bool
) -> None:
    found = list(inspect.signature(function).parameters)
    assert found == parameters, f"{function.__qualname__}{found}, expected {parameters}: {RECHECK}"
    assert inspect.iscoroutinefunction(function) is coroutine, f"{function.__qualname__}: {RECHECK}"


def test_the_overridden_classes_are_still_quarts_hooks() -> None:
    """Quart builds each HTTP connection from `asgi_http_class(app, scope)`, each request from
    `request_class`, and sessions from `session_interface`: PaymentApp replaces all three."""
    assert Quart.asgi_http_class is ASGIHTTPConnection, RECHECK
    assert "self.asgi_http_class(self, scope)" in inspect.getsource(Quart.asgi_app), RECHECK
    assert Quart.request_class is Request, RECHECK
    assert isinstance(Quart.session_interface, SecureCookieSessionInterface), RECHECK
    assert (PaymentApp.asgi_http_class, PaymentApp.request_class) == (
        HandledInPlace,
        PaymentRequest,
    )
    assert isinstance(PaymentApp.session_interface, NoSessions)
    assert issubclass(NullSession, dict), RECHECK
    # PaymentRequest caches Quart's `blueprints`, a property derived from `url_rule`.
    assert isinstance(inspect.getattr_static(Request, "blueprints"), property), RECHECK
    assert "url_rule" in Request.__annotations__ or hasattr(Request, "url_rule"), RECHECK
    # app/routes.py drains a refused body by iterating Quart's request body.
    assert hasattr(Body, "__aiter__") and hasattr(Body, "__anext__"), RECHECK


def test_the_re_implemented_http_call_is_quarts_as_read() -> None:
    """HandledInPlace.__call__ does what Quart's ASGIHTTPConnection.__call__ does with one task
    fewer; a change to Quart's must be carried over by hand."""
    quart_call = textwrap.dedent(inspect.getsource(ASGIHTTPConnection.__call__)).strip()
    assert quart_call == QUART_HTTP_CALL.strip(), (
        f"Quart's ASGIHTTPConnection.__call__ changed; compare it with HandledInPlace.__call__. "
        f"{RECHECK}. It reads now:\n{quart_call}"
    )


def test_the_proxies_still_hand_out_their_objects() -> None:
    """app/context.py and app/hooks.py unwrap Quart's context proxies (Werkzeug's LocalProxy)."""
    from quart import current_app, g, request

    for proxy in (current_app, g, request):
        assert hasattr(proxy, "_get_current_object"), RECHECK
