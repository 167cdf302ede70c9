"""Locust load tests and the throughput comparison of sglang-ams against production SGLang (see README.md).

Modules: workloads (prompts, request bodies, answers), locustfile (Locust users), metrics (Prometheus text,
request statistics), servers (start/poll/stop launch_server), report (table, CSV, plots, JSON), compare (the
command), fake_server (a CPU stand-in for launch_server used by the tests).
"""
