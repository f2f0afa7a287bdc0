-- segment-relay queue schema. Applied at every start; every statement is idempotent.

-- Accepted Segment calls (and the relay's own session events) waiting to be forwarded.
-- `seq` is the acceptance order: forwarding follows it per user.
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,              -- the enriched message as JSON
    received_at REAL NOT NULL,       -- Unix seconds
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    last_error TEXT
);
-- Messages that were tried and wait for a retry: they hold back their user's later messages.
CREATE INDEX IF NOT EXISTS messages_backoff ON messages (user_key, seq) WHERE next_attempt_at > 0;

-- messageIds accepted per source within the dedup window.
CREATE TABLE IF NOT EXISTS dedup (
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_age ON dedup (received_at);

-- Every stored Segment call records its messageId for dedup in the same statement.
CREATE TRIGGER IF NOT EXISTS messages_dedup AFTER INSERT ON messages
WHEN NEW.type NOT IN ('session_start', 'session_end')
BEGIN
    INSERT OR REPLACE INTO dedup (source, message_id, received_at)
    VALUES (NEW.source, NEW.message_id, NEW.received_at);
END;

-- Messages the destination refused or that could not be mapped, with the reason.
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    received_at REAL NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    response_status INTEGER,
    response_body TEXT,
    attempts INTEGER NOT NULL,
    first_attempt_at REAL,
    last_attempt_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason, id);

-- Counters that survive restarts (sent, retried, dead-lettered...).
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- Event types and customer property keys this relay has sent to the project, for Infinario's
-- project-wide limit of 255 of each.
CREATE TABLE IF NOT EXISTS project_names (
    kind TEXT NOT NULL,               -- event_type or customer_property
    name TEXT NOT NULL,
    PRIMARY KEY (kind, name)
) WITHOUT ROWID;

-- Open sessions, one per user key. `expires_at` is on the wall clock: the one timer closes
-- sessions in expiry order, so a million open sessions cost rows, not coroutines.
CREATE TABLE IF NOT EXISTS sessions (
    user_key TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    started_at REAL NOT NULL,         -- event time of the first call
    last_activity REAL NOT NULL,      -- event time of the latest call
    expires_at REAL NOT NULL,         -- wall clock
    ids BLOB NOT NULL,                -- JSON: userId / anonymousId known to the session
    context BLOB                      -- JSON: the context of the call that opened it
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
