"""The HTTP API of the Payment Service (Quart on Hypercorn)."""
