-- Version 2: each relay's view of the destination (JSON, see Queue.note_destination), written
-- when it changes, for `segment-relay status`.
ALTER TABLE instances ADD COLUMN destination text;
