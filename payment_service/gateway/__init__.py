"""The payment gateway: where money moves.

`interface` is what the rest of the service sees: the `Gateway` protocol, its domain types
(`Intent`, `Refund`, `GatewayEvent`, …) and errors that tell "the gateway refused, nothing moved"
from "the outcome is unknown, ask again". Each gateway has one adapter behind it
(`stripe_adapter`, the only one today); nothing outside an adapter knows a field of its gateway's
protocol. `amounts` converts our decimal amounts to the gateway's integers and back, `factory`
builds the configured gateway, and `embedded` runs a local Stripe-compatible gateway as a
separate process for `payment-service run` and the tests.

Nothing here is imported at start-up unless a gateway is configured: the adapter loads the SDK.
"""
