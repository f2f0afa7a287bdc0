-- segment-relay PostgreSQL queue schema, version 1 (docs/queue.md). Applied in one
-- transaction under an advisory lock; the version is recorded in segment_relay_schema.

-- Accepted Segment calls (and the relay's own session events) waiting to be forwarded.
-- `seq` is the acceptance order of a user's calls: a call acked before another is sent has a
-- lower seq (sequence values are not in commit order across concurrent transactions, so no
-- reader reads "after a seq"). `bucket` is the user's bucket (see leases).
-- A queue deletes what it delivers: autovacuum runs on this table after every 2,000 dead
-- rows, not after a fifth of the table, and without sleeping, so the space of delivered rows
-- is reused rather than added to (the soak in bench/pg_soak.py measures it).
CREATE TABLE messages (
    seq bigserial PRIMARY KEY,
    bucket smallint NOT NULL,
    source text NOT NULL,
    message_id text NOT NULL,
    user_key text NOT NULL,
    type text NOT NULL,
    body text NOT NULL,                 -- the enriched message as JSON
    received_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    first_attempt_at double precision,
    last_error text
) WITH (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
-- No index on bucket: a relay reads in seq order and skips other relays' buckets, and every
-- index on this table is paid at every insert (bench/pg.py: one more cost ingest 10-15%).
-- Messages that wait for a retry: they hold back their user's later messages.
CREATE INDEX messages_backoff ON messages (user_key, seq) WHERE next_attempt_at > 0;

-- messageIds accepted per source within the dedup window; pruned past it.
CREATE TABLE dedup (
    source text NOT NULL,
    message_id text NOT NULL,
    received_at double precision NOT NULL,
    PRIMARY KEY (source, message_id)
) WITH (
    autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX dedup_age ON dedup (received_at);

-- Messages the destination refused or that could not be mapped, with the reason.
CREATE TABLE dead_letters (
    id bigserial PRIMARY KEY,
    seq bigint NOT NULL,
    bucket smallint NOT NULL,
    source text NOT NULL,
    message_id text NOT NULL,
    user_key text NOT NULL,
    type text NOT NULL,
    body text NOT NULL,
    received_at double precision NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL DEFAULT '',
    response_status integer,
    response_body text,
    attempts integer NOT NULL,
    first_attempt_at double precision,
    last_attempt_at double precision NOT NULL
);
CREATE INDEX dead_letters_reason ON dead_letters (reason, id);

-- Counters that survive restarts, one row per name and relay process (so that relays do
-- not wait for each other's counter rows); `status` adds them up.
CREATE TABLE counters (
    name text NOT NULL,
    owner text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (name, owner)
);

-- Event types and customer property keys sent to the project (Infinario's limit of 255).
CREATE TABLE project_names (
    kind text NOT NULL,
    name text NOT NULL,
    PRIMARY KEY (kind, name)
);

-- Open sessions, one per user key across every relay. The ingest transaction locks a
-- user's row (and takes an advisory lock on the user for a new one); the owner of the
-- user's bucket closes it, inserting session_end in the same transaction that deletes it.
CREATE TABLE sessions (
    user_key text PRIMARY KEY,
    bucket smallint NOT NULL,
    source text NOT NULL,
    started_at double precision NOT NULL,
    last_activity double precision NOT NULL,
    expires_at double precision NOT NULL,  -- wall clock
    ids text NOT NULL,                     -- JSON: userId / anonymousId known to the session
    context text                           -- JSON: the context of the call that opened it
) WITH (
    autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX sessions_expiry ON sessions (bucket, expires_at);

-- The relays sharing this database, each renewing its row with its leases.
CREATE TABLE instances (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    forwarding boolean NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- Users hash into buckets; each bucket is leased to one live relay, which alone forwards its
-- users' messages and closes their sessions. `epoch` grows at every change of owner: every
-- write only the owner may make checks it (the fence), so a relay that lost a bucket while
-- paused cannot write over its successor. Leases run on the database's clock.
CREATE TABLE leases (
    bucket smallint PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO leases (bucket) SELECT generate_series(0, 63);
