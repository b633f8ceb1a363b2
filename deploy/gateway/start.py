"""docker-compose's `gateway`: localstripe (a local Stripe fake) with the API's webhook registered.

localstripe keeps its objects and its webhooks in memory only (everything is gone when it stops),
and its webhooks are registered over HTTP. This starts it as a child process, waits until it
answers, registers GATEWAY_WEBHOOK_URL signed with STRIPE_WEBHOOK_SECRET (the API's), then waits
for it; SIGTERM and SIGINT are passed on. A restart of the container starts it afresh and
registers the webhook again. Standard library only: the image holds localstripe and this.

Settings (environment): STRIPE_WEBHOOK_SECRET (required), GATEWAY_WEBHOOK_URL (required),
GATEWAY_PORT (8420).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

START_TIMEOUT_SECONDS = 60
POLL_SECONDS = 0.2
REQUEST_TIMEOUT_SECONDS = 5
WEBHOOK_ID = "payment-service"
# localstripe takes any key that starts with sk_.
AUTH = {"Authorization": "Bearer sk_test_embedded"}


def say(message: str) -> None:
    print(f"gateway: {message}", file=sys.stderr, flush=True)


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """One request; its status, 0 when nothing answered."""
    req = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310 - our own URL
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_SECONDS) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def main() -> int:
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET", "")
    webhook_url = os.environ.get("GATEWAY_WEBHOOK_URL", "")
    port = int(os.environ.get("GATEWAY_PORT", "8420"))
    if not secret or not webhook_url:
        say("set STRIPE_WEBHOOK_SECRET and GATEWAY_WEBHOOK_URL")
        return 2
    child = subprocess.Popen(["localstripe", "--port", str(port), "--from-scratch"])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while request(f"{base}/v1/events?limit=1", headers=AUTH) != 200:
        if child.poll() is not None or time.monotonic() > deadline:
            say("localstripe did not start")
            child.kill()
            return 1
        time.sleep(POLL_SECONDS)
    body = urllib.parse.urlencode({"url": webhook_url, "secret": secret}).encode()
    if request(f"{base}/_config/webhooks/{WEBHOOK_ID}", data=body) != 200:
        say("the webhook could not be registered")
        child.kill()
        return 1
    say(f"localstripe on port {port}, its events sent to {webhook_url}")
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
