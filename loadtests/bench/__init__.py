"""`make bench` (`python -m loadtests.bench`): side-by-side benchmarks; see runner.py and
docs/benchmarks.md.

runner (the command line and the order of sections) · harness (the run's PostgreSQL and
databases) · contenders (POST /payments under wrk) · pgbench (the database's ceiling) · relay
(relay throughput, callback latency, oldest pending) · profiling (py-spy) · report (table and
Markdown) · load (wrk and a steady-rate client) · processes (children, readiness, CPU) · paths.
"""
