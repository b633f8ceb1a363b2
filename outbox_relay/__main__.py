"""`python -m outbox_relay`: the relay alone, exactly as `payment-service relay` runs it."""

import argparse
import sys

from outbox_relay import RELAY_DESCRIPTION
from outbox_relay.main import run_relay
from payment_service.entry import database_settings, run_command

argparse.ArgumentParser(prog="python -m outbox_relay", description=RELAY_DESCRIPTION).parse_args()
sys.exit(run_command(lambda: run_relay(database_settings())))
