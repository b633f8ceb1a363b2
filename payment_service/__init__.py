"""The shared core of the Payment Service: settings, database access, logging, migrations, signing.

The bottom layer: `app` (the HTTP API) and `outbox_relay` (delivery) both build on it, and it
imports neither; only the command line (`payment_cli`) imports both. `make lint` checks the rule.
"""

__version__ = "1.0.0"
SERVICE_NAME = "payment-service"
# The channel the API's transactions NOTIFY and the relay LISTENs on.
OUTBOX_CHANNEL = "outbox_events"
# The channel every change to an endpoint NOTIFYs, so that running relays reload at once.
ENDPOINTS_CHANNEL = "endpoints"
# prometheus_client's multiprocess directory: the workers of `serve` write their metric values
# there (app.metrics); the relay, one process serving its own metrics, must never write into it.
MULTIPROCESS_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
