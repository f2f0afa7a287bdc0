-- Version 4: backfill (docs/operations.md, "Importing archives"). Imported messages wait here,
-- apart from the queue, and the relay moves them into it only while live calls are not
-- waiting; `imported_ids` remembers every messageId imported, for good, so that importing
-- a file again queues nothing.
CREATE TABLE IF NOT EXISTS imports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    received_at REAL NOT NULL        -- when it was imported (max_age counts from there)
);

CREATE TABLE IF NOT EXISTS imported_ids (
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
