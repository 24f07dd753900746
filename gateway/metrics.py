"""Prometheus metrics of one gateway process (its own registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter(
            "keyturn_gateway_commands_total",
            "Commands by outcome (allowed, held, blocked, failed, rejected; approved_executed and"
            " approved_failed for approved commands this gateway ran).",
            ["outcome"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "keyturn_gateway_pending_requests",
            "Requests waiting for a decision.",
            registry=self.registry,
        )
        self.waiters = Gauge(
            "keyturn_gateway_waiting_polls",
            "Long-polls waiting in this process.",
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "keyturn_gateway_http_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.readonly_logins = Gauge(
            "keyturn_gateway_readonly_logins",
            "Open read-only logins (one Vault lease and pool per agent identity and target).",
            registry=self.registry,
        )
        self.readonly_logins_limit = Gauge(
            "keyturn_gateway_readonly_logins_limit",
            "The most read-only logins open at once (gateway.readonly_logins).",
            registry=self.registry,
        )
        self.readonly_leases_unrevoked = Gauge(
            "keyturn_gateway_readonly_leases_unrevoked",
            "Retired read-only leases Vault could not revoke yet (retried every few seconds).",
            registry=self.registry,
        )
        self.readonly_logins_closed = Counter(
            "keyturn_gateway_readonly_logins_closed_total",
            "Read-only logins closed (their lease revoked), by reason: idle, evicted, shutdown.",
            ["reason"],
            registry=self.registry,
        )
        self.truncated = Counter(
            "keyturn_gateway_results_truncated_total",
            "Results cut short, by the cap that applied: rows, value_bytes, response_bytes.",
            ["cap"],
            registry=self.registry,
        )
        self.shadow = Counter(
            "keyturn_gateway_shadow_matches_total",
            "Commands a shadow rule matched, by rule and the action it would have taken.",
            ["rule", "action"],
            registry=self.registry,
        )
        self.execute_seconds = Histogram(
            "keyturn_gateway_execute_seconds",
            "Time running allowed commands on targets.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # the Postgres protocol's edge (gateway.postgres_listen)
        self.pg_connections = Gauge(
            "keyturn_gateway_pg_connections",
            "Postgres-protocol client connections open (authenticated or not).",
            registry=self.registry,
        )
        self.pg_connections_refused = Counter(
            "keyturn_gateway_pg_connections_refused_total",
            "Postgres-protocol connections refused, by reason: auth, limit, tls, protocol.",
            ["reason"],
            registry=self.registry,
        )
        self.pg_statements = Counter(
            "keyturn_gateway_pg_statements_total",
            "Statements from Postgres-protocol clients, by how they ended: executed, failed,"
            " denied, expired, blocked, refused (by the edge), local (answered by the edge).",
            ["verdict"],
            registry=self.registry,
        )
        self.pg_held_seconds = Histogram(
            "keyturn_gateway_pg_held_seconds",
            "Time a Postgres-protocol client waited on a held statement.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
