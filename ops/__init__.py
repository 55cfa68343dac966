"""Operations: metric definitions, log setup, dashboards, alerts, runbooks, load/chaos/bench harnesses.

The metric names below are the contract with ops/grafana and ops/prometheus; every package
(bridges, engine, policies, bot) records into these objects so on-call sees one vocabulary.
"""
