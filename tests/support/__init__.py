"""What the tests share: one place for each kind of helper.

- `commands`: the command line of `payment-service` (one builder) and running it to the end;
- `environment`: the environment variables a test gives to the processes it starts;
- `processes`: the service's processes, started, signalled and stopped by PID;
- `receiver`: the one test receiver, a stand-in Notification Service on 127.0.0.1;
- `database`: the session's PostgreSQL, per-test databases, a PostgreSQL a test may stop, rows;
- `api`: the app served in the test's event loop, and the API contract's assertions;
- `waiting`: waits on a condition with a deadline.

Fixtures defined here are registered in tests/conftest.py.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
