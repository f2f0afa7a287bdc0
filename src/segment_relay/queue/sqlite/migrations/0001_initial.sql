-- segment-relay queue schema, version 1: the schema of the releases before schema versions.
-- Every statement creates only what is missing, so that a queue made by those releases
-- (user_version 0) is taken as it is and upgraded from here.

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

-- The outcome of a send, written by one statement: `INSERT INTO settlements` runs this
-- trigger inside that one step of SQLite's C code, so the SQLite thread takes Python's lock
-- back once per outcome (with autocommit, BEGIN and COMMIT are in that step too). Each column
-- is a JSON array: acked [seq], retry [[seq, next_attempt_at, error, attempts to add]],
-- dead [[seq, reason, detail, response_status, response_body]], names [[kind, name]],
-- counters {name: n}; `now` stamps the attempt.
CREATE VIEW IF NOT EXISTS settlements (acked, retry, dead, names, counters, now) AS
SELECT NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;

CREATE TRIGGER IF NOT EXISTS settle INSTEAD OF INSERT ON settlements
BEGIN
    INSERT INTO dead_letters (seq, source, message_id, user_key, type, body, received_at, reason,
                              detail, response_status, response_body, attempts,
                              first_attempt_at, last_attempt_at)
    SELECT m.seq, m.source, m.message_id, m.user_key, m.type, CAST(m.body AS TEXT), m.received_at,
           json_extract(d.value, '$[1]'), json_extract(d.value, '$[2]'),
           json_extract(d.value, '$[3]'), json_extract(d.value, '$[4]'), m.attempts + 1,
           COALESCE(m.first_attempt_at, NEW.now), NEW.now
    FROM json_each(NEW.dead) AS d JOIN messages AS m ON m.seq = json_extract(d.value, '$[0]')
    ORDER BY d.key;
    DELETE FROM messages
    WHERE seq IN (SELECT value FROM json_each(NEW.acked))
       OR seq IN (SELECT json_extract(value, '$[0]') FROM json_each(NEW.dead));
    UPDATE messages
    SET next_attempt_at = json_extract(r.value, '$[1]'), last_error = json_extract(r.value, '$[2]'),
        attempts = attempts + json_extract(r.value, '$[3]'),
        first_attempt_at = COALESCE(first_attempt_at, NEW.now)
    FROM json_each(NEW.retry) AS r
    WHERE messages.seq = json_extract(r.value, '$[0]');
    INSERT OR IGNORE INTO project_names (kind, name)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(NEW.names);
    INSERT INTO counters (name, value)
    SELECT key, value FROM json_each(NEW.counters) WHERE true
    ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
END;

-- A group commit with session activity whose sessions the event loop already knows (see
-- SessionCache), written by one statement: one step of SQLite, autocommit, no Python on the
-- SQLite thread between its reads and writes. Each column is a JSON array:
-- assumed [[user_key, started_at, last_activity, expires_at]] is what the rules were given for
-- each user with activity ([user_key] alone: no session); sessions is
-- [[user_key, source, started_at, last_activity, expires_at, ids, context]] (ids and context
-- as JSON objects, context may be null); messages is as for insert_messages. The commit is
-- refused as a whole (nothing is written) when a user's session is not as assumed, or when a
-- message's messageId was accepted before within the dedup window; the store then applies it
-- by reading those in its transaction (where it writes its sessions with this statement too,
-- with nothing assumed and no messages).
CREATE VIEW IF NOT EXISTS session_commits (assumed, sessions, messages) AS
SELECT NULL, NULL, NULL WHERE 0;

CREATE TRIGGER IF NOT EXISTS session_commit INSTEAD OF INSERT ON session_commits
BEGIN
    SELECT RAISE(ABORT, 'segment-relay: sessions not as assumed') WHERE EXISTS (
        SELECT 1 FROM json_each(NEW.assumed) AS a
        LEFT JOIN sessions AS s ON s.user_key = json_extract(a.value, '$[0]')
        WHERE s.started_at IS NOT json_extract(a.value, '$[1]')
           OR s.last_activity IS NOT json_extract(a.value, '$[2]')
           OR s.expires_at IS NOT json_extract(a.value, '$[3]'));
    INSERT OR REPLACE INTO sessions (user_key, source, started_at, last_activity, expires_at, ids,
                                     context)
    SELECT json_extract(s.value, '$[0]'), json_extract(s.value, '$[1]'),
           json_extract(s.value, '$[2]'), json_extract(s.value, '$[3]'),
           json_extract(s.value, '$[4]'), json_extract(s.value, '$[5]'),
           json_extract(s.value, '$[6]')
    FROM json_each(NEW.sessions) AS s;
    -- The messages are read once: each is checked for a repeat as it is inserted.
    INSERT INTO messages (source, message_id, user_key, type, body, received_at)
    SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'),
           json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]'),
           json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]')
    FROM json_each(NEW.messages) AS j
    WHERE NOT EXISTS (
        SELECT 1 FROM dedup
        WHERE source = json_extract(j.value, '$[0]') AND message_id = json_extract(j.value, '$[1]')
          AND received_at >= json_extract(j.value, '$[6]')
    ) OR RAISE(ABORT, 'segment-relay: a messageId accepted before');
END;
