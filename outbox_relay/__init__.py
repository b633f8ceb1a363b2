"""The outbox relay: delivers outbox events as signed HTTP callbacks."""

# The one-line description of `payment-service relay` and `python -m outbox_relay`.
RELAY_DESCRIPTION = (
    "Deliver outbox events to every subscribed endpoint (payment-service endpoints list): one "
    "signed HTTP callback per event and endpoint that wants it."
)
