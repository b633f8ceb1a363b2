"""`python -m outbox_relay`: the relay alone, exactly as `payment-service relay` runs it."""

import sys

from payment_service.cli import main

sys.exit(main(["relay", *sys.argv[1:]]))
