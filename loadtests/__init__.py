"""Load tests and benchmarks: `make loadtest` (Locust) and `make bench`; see README.md."""
