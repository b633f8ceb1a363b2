"""The operator console at `{API_PREFIX}/admin/console/`: server-rendered pages over the same core
as the command line and the admin API, for operators in a browser.

Registered by `create_app` only when ADMIN_API_KEYS is set (else its paths answer 404, as the
admin API's do). Operators sign in with an admin key and get a short-lived signed session
(`session`); every action asks for confirmation, carries the session's CSRF token and is recorded
in the audit log as `console:<admin key name>` (`views`). The pages work without JavaScript and
load nothing but the service's own stylesheet (their Content-Security-Policy allows nothing
else).
"""

from __future__ import annotations

from app.console.session import Sessions
from app.console.views import SESSIONS, blueprint
from app.context import PaymentApp


def install_console(app: PaymentApp) -> None:
    """Serve the console under `{API_PREFIX}/admin/console` (the caller checks ADMIN_API_KEYS)."""
    app.extensions[SESSIONS] = Sessions(app.settings.admin_api_keys)
    app.register_blueprint(blueprint, url_prefix=app.settings.api_prefix + "/admin/console")


__all__ = ["install_console"]
