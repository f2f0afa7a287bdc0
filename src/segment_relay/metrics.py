"""Every counter the relay keeps, in one place, as Prometheus metrics.

Each app gets its own registry, so several relays (as in the tests) never share counts.
Labels never carry a write key, token or user id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The relay's metrics, registered in their own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "segment_relay_requests",
            "HTTP requests to the Segment API by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.messages_received = Counter(
            "segment_relay_messages_received",
            "Messages received by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.messages_stored = Counter(
            "segment_relay_messages_stored", "Messages committed to the queue", registry=r
        )
        self.messages_duplicate = Counter(
            "segment_relay_messages_duplicate",
            "Messages answered 200 but not stored again (dedup)",
            registry=r,
        )
        self.messages_rejected = Counter(
            "segment_relay_messages_rejected",
            "Messages refused at ingest by reason",
            ["reason"],
            registry=r,
        )
        self.refusals_not_kept = Counter(
            "segment_relay_refusals_not_kept",
            "Messages refused at ingest that could not be kept as dead letters (queue errors)",
            registry=r,
        )
        self.requests_refused = Counter(
            "segment_relay_requests_refused",
            "Requests refused whole (4xx) by reason: invalid_json, invalid_write_key, ...",
            ["reason"],
            registry=r,
        )
        self.commands_sent = Counter(
            "segment_relay_commands_sent", "Commands sent to the destination", registry=r
        )
        self.commands_acked = Counter(
            "segment_relay_commands_acked", "Commands the destination accepted", registry=r
        )
        self.commands_retried = Counter(
            "segment_relay_commands_retried",
            "Commands scheduled to be sent again, by reason",
            ["reason"],
            registry=r,
        )
        self.commands_dead = Counter(
            "segment_relay_commands_dead_lettered",
            "Messages moved to the dead-letter table by reason",
            ["reason"],
            registry=r,
        )
        self.order_lost = Counter(
            "segment_relay_order_lost",
            "Commands the destination accepted after asking to retry an earlier one of their user",
            registry=r,
        )
        self.messages_skipped = Counter(
            "segment_relay_messages_skipped",
            "Messages the mapping skips by design, by reason",
            ["reason"],
            registry=r,
        )
        self.dropped_keys = Counter(
            "segment_relay_dropped_property_keys",
            "Property keys left out over the 255-key limit, by event type (customer for updates)",
            ["event_type"],
            registry=r,
        )
        self.send_seconds = Histogram(
            "segment_relay_send_seconds",
            "Latency of requests to the destination",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "segment_relay_batch_size",
            "Commands per request to the destination",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 40, 50),
        )
        self.queue_reads = Counter(
            "segment_relay_queue_reads",
            "Reads of the queue by the forwarder for messages to send",
            registry=r,
        )
        self.queue_depth = Gauge(
            "segment_relay_queue_depth", "Messages waiting in the queue", registry=r
        )
        self.queue_oldest_age = Gauge(
            "segment_relay_queue_oldest_age_seconds", "Age of the oldest queued message", registry=r
        )
        self.queue_in_backoff = Gauge(
            "segment_relay_queue_in_backoff", "Queued messages waiting for a retry", registry=r
        )
        self.destination_state = Gauge(
            "segment_relay_destination_state",
            "1 for the destination's current state as this relay sees it: up, down or paused",
            ["state"],
            registry=r,
        )
        self.destination_state_seconds = Gauge(
            "segment_relay_destination_state_seconds",
            "How long the destination has been in its current state",
            registry=r,
        )
        self.destination_next_probe_seconds = Gauge(
            "segment_relay_destination_next_probe_seconds",
            "Seconds until the next probe of a destination down or paused (0 when up)",
            registry=r,
        )
        self.destination_paused = Gauge(
            "segment_relay_destination_paused",
            "1 for why forwarding is paused: credentials (401/403), configuration (every "
            "command refused alike) or retry_after (the destination asked to wait)",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "segment_relay_dead_letters",
            "Dead letters kept in the queue by reason (until replayed or purged)",
            ["reason"],
            registry=r,
        )
        self.sessions_open = Gauge("segment_relay_sessions_open", "Open sessions", registry=r)
        self.sessions_started = Gauge(
            "segment_relay_sessions_started",
            "Sessions started since this process began",
            registry=r,
        )
        self.sessions_ended = Gauge(
            "segment_relay_sessions_ended", "Sessions ended since this process began", registry=r
        )
        self.session_commits = Gauge(
            "segment_relay_session_commits",
            "Commits with session activity since this process began",
            registry=r,
        )
        self.session_commits_read = Gauge(
            "segment_relay_session_commits_read",
            "Of those, commits that read sessions from the database: a user's session was not "
            "in the cache (sessions.cache_size) or a messageId repeated",
            registry=r,
        )
