-- Version 3: what the running relay knows that `segment-relay status` shows, by name: the
-- destination's state (JSON, see Queue.note_destination), written when it changes.
CREATE TABLE IF NOT EXISTS relay_state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
