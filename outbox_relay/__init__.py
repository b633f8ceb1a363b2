"""The outbox relay: delivers outbox events as signed HTTP callbacks."""
