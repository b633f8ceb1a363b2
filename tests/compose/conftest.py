"""The compose smoke test and the failover demonstration need a Docker engine and docker-compose,
build the image and start five (six) containers: they are collected only when asked for with
`COMPOSE_SMOKE=1` (CI does, after starting its engine), so a plain `make test` stays fast and
Docker-free. The checks of the compose files themselves need neither and always run."""

import os

collect_ignore = (
    []
    if os.environ.get("COMPOSE_SMOKE") == "1"
    else ["test_compose_smoke.py", "test_failover_demo.py"]
)
