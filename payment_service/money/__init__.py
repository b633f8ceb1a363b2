"""Where money moves: charges and refunds at the payment gateway, staged, made and settled.

The API and the relay's gateway worker both finish charges and refunds ("given what the gateway
says, write the result, its outbox event and the idempotency key's answer"), and they never
import each other; what they share lives here:
- `fragments`: the SQL fragments every write of a payment's state composes: its outbox event with
  the deliveries, and the idempotency key's answer (stored with the operation, or filled in later);
- `operations`: the `gateway_operations` table (one charge or refund at the gateway, its phase,
  its lease) and the `gateway_events` table (webhooks stored once);
- `results`: what the calls end in (`Decided`, `Undecided`, `LeaseLost`) and how a result is
  written under the payment's row lock;
- `charges` and `refunds`: the calls of phase 2 and the statements of phase 3, as state
  machines over what the gateway answers;
- `webhooks`: the gateway's events applied forward-only;
- `schedule`: how long to wait before asking the gateway again;
- `review`: the operations flagged for review and what the gateway says about each now;
- `history`: a payment's operations and webhooks at the gateway, for the console's story.
docs/gateway.md describes the phases; `payment_service.gateway` is the gateway itself.
"""
