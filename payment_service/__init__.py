"""Shared plumbing of the Payment Service: configuration, database access, migrations and the CLI.

`app` (the HTTP API) and `outbox_relay` (delivery) both build on this package; neither imports the
other.
"""

__version__ = "1.0.0"
SERVICE_NAME = "payment-service"
# The channel the API's transactions NOTIFY and the relay LISTENs on.
OUTBOX_CHANNEL = "outbox_events"
