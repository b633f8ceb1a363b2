"""The `payment-service` command line and its operational tools.

The top layer: the only package that imports both `app` (the HTTP API) and `outbox_relay`
(delivery). Beside the command itself it holds what operates the whole service: `run`'s
supervisor, the consistency `check` and the stand-in receiver `notification-sink`. See
docs/architecture.md for the import rule.
"""
