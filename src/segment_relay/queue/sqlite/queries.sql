-- The SQLite queue's queries, loaded by name by store.py (the only module that runs them).
-- Each query starts with a line "-- name: NAME".

-- name: insert_messages
-- Every message of a group commit in one statement: ? is a JSON array of
-- [source, message_id, user_key, type, body, received_at, dedup_since]. One statement is one
-- step of SQLite's C code, so the SQLite thread gives up and takes back Python's lock once per
-- commit instead of once per row (under load that wait was most of a commit's time).
-- A Segment call is stored unless its messageId was accepted from the same source within the
-- dedup window (the trigger messages_dedup records it); the relay's session events always
-- are. The statement does not see its own trigger's rows: repeats within one array are
-- removed by the caller.
INSERT INTO messages (source, message_id, user_key, type, body, received_at)
SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
       json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]')
FROM json_each(?) AS j
WHERE json_extract(j.value, '$[3]') IN ('session_start', 'session_end')
   OR NOT EXISTS (
    SELECT 1 FROM dedup
    WHERE source = json_extract(j.value, '$[0]') AND message_id = json_extract(j.value, '$[1]')
      AND received_at >= json_extract(j.value, '$[6]')
);

-- name: inserted_since
SELECT source, message_id FROM messages WHERE seq > ? AND seq <= ?;

-- name: count_messages
SELECT COUNT(*) FROM messages;

-- name: due_messages
-- Due: its retry time has come, no earlier message of its user waits for a retry, and its
-- user has no batch in flight (:busy, a JSON array of user keys). Only seqs above :after are
-- read: the forwarder passes what earlier reads showed holds no other due row.
-- The rows come back as one JSON array in one result row: one step of SQLite, so the SQLite
-- thread takes Python's lock back once, not once per row. Each row is a json_array (made in C
-- in one call; a chain of || copied the row, body included, at every step: 1.4 -> 0.8 ms for
-- 200 rows). The stored bodies come as JSON strings: the forwarder parses a body only when a
-- batch takes its row. (json_group_array's order is the subquery's in practice; the caller
-- sorts by seq all the same.) The second column is the highest seq in the same snapshot: how
-- far a read that found fewer than :limit rows looked; the third counts replays (see
-- count_replayed).
SELECT json_group_array(json_array(
    seq, source, message_id, user_key, type, CAST(body AS TEXT), received_at, attempts,
    next_attempt_at, first_attempt_at, last_error)),
    (SELECT COALESCE(MAX(seq), 0) FROM messages),
    (SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = 'replayed')
FROM (
    SELECT * FROM messages AS m
    WHERE m.seq > :after
      AND m.next_attempt_at <= :now
      AND m.user_key NOT IN (SELECT value FROM json_each(:busy))
      AND NOT EXISTS (
          SELECT 1 FROM messages AS earlier
          WHERE earlier.user_key = m.user_key AND earlier.seq < m.seq
            AND earlier.next_attempt_at > 0 AND earlier.next_attempt_at > :now
      )
    ORDER BY m.seq
    LIMIT :limit
);

-- name: next_retry_at
SELECT MIN(next_attempt_at) FROM messages WHERE next_attempt_at > 0;

-- name: settle
-- See the trigger `settle` in migrations/0001_initial.sql.
INSERT INTO settlements (acked, retry, dead, names, counters, now) VALUES (?, ?, ?, ?, ?, ?);

-- name: project_names
SELECT kind, name FROM project_names;

-- name: prune_dedup
DELETE FROM dedup WHERE received_at < ?;

-- name: session_inputs
-- What the session rules need for one commit, in one row: the (source, messageId) pairs of
-- :pairs (a JSON array) accepted within the dedup window, and the sessions of the users in
-- :users (a JSON array), each as a JSON array (the context as a string of JSON).
SELECT
    (SELECT json_group_array(json_array(d.source, d.message_id))
     FROM json_each(:pairs) AS j
     JOIN dedup AS d
       ON d.source = json_extract(j.value, '$[0]') AND d.message_id = json_extract(j.value, '$[1]')
     WHERE d.received_at >= :since),
    (SELECT '[' || COALESCE(group_concat(
        '[' || json_quote(user_key) || ',' || json_quote(source) || ',' || json_quote(started_at)
        || ',' || json_quote(last_activity) || ',' || json_quote(expires_at) || ','
        || CAST(ids AS TEXT) || ',' || json_quote(CAST(context AS TEXT)) || ']', ','), '')
        || ']'
     FROM sessions WHERE user_key IN (SELECT value FROM json_each(:users)));

-- name: expired_sessions
SELECT user_key, source, started_at, last_activity, expires_at, ids, context
FROM sessions WHERE expires_at <= ? ORDER BY expires_at LIMIT ?;

-- name: delete_session
DELETE FROM sessions WHERE user_key = ?;

-- name: session_stats
SELECT COUNT(*), MIN(expires_at) FROM sessions;

-- name: queue_stats
SELECT COUNT(*), COALESCE(SUM(next_attempt_at > ?), 0), MIN(received_at) FROM messages;

-- name: dead_letter_counts
SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason;

-- name: counters
SELECT name, value FROM counters;

-- name: dead_letters
SELECT id, seq, source, message_id, user_key, type, body, received_at, reason, detail,
       response_status, response_body, attempts, first_attempt_at, last_attempt_at
FROM dead_letters
WHERE (:reason IS NULL OR reason = :reason) AND id > :after
ORDER BY id LIMIT :limit;

-- name: dead_letter
SELECT id, seq, source, message_id, user_key, type, body, received_at, reason, detail,
       response_status, response_body, attempts, first_attempt_at, last_attempt_at
FROM dead_letters WHERE id = ?;

-- name: replay_message
-- A replayed dead letter goes back under its original seq (never reused: AUTOINCREMENT), so
-- it keeps its place in its user's order; its attempts and its max_age clock start again.
-- One refused at ingest has no seq (0): once fixed, it takes a new one; until then, it stays.
INSERT INTO messages (seq, source, message_id, user_key, type, body, received_at)
SELECT NULLIF(seq, 0), source, message_id, user_key, type, body, :now FROM dead_letters
WHERE id = :id AND reason NOT IN ('invalid', 'too_large');

-- name: count_replayed
-- In the replay's transaction: the forwarder sees that messages came back under old seqs.
INSERT INTO counters (name, value) VALUES ('replayed', ?)
ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;

-- name: delete_dead_letter
DELETE FROM dead_letters WHERE id = ? AND reason NOT IN ('invalid', 'too_large');

-- name: insert_refused
-- A message refused at ingest (records.Refusal): no seq, never attempted.
INSERT INTO dead_letters (seq, source, message_id, user_key, type, body, received_at, reason,
                          detail, attempts, last_attempt_at)
VALUES (0, :source, :message_id, :user_key, :type, :body, :received_at, :reason, :detail, 0,
        :received_at);

-- name: fix_dead_letter
UPDATE dead_letters
SET message_id = :message_id, user_key = :user_key, type = :type, body = :body,
    reason = 'fixed', detail = :detail, response_status = NULL, response_body = NULL
WHERE id = :id;

-- name: purge_dead_letters
DELETE FROM dead_letters WHERE last_attempt_at < ?;

-- name: commit_sessions
-- See the trigger `session_commit` in migrations/0002_session_events_skip_dedup.sql.
INSERT INTO session_commits (assumed, sessions, messages) VALUES (?, ?, ?);

-- name: note_destination
INSERT INTO relay_state (name, value) VALUES ('destination', ?)
ON CONFLICT (name) DO UPDATE SET value = excluded.value;

-- name: destinations
SELECT '', value FROM relay_state WHERE name = 'destination';

-- name: retry_now
-- Messages waiting for a retry, due now (`segment-relay retry-now`). Counted as replays: they
-- are due again below what the forwarder's reads have covered.
UPDATE messages SET next_attempt_at = 0 WHERE next_attempt_at > ?;

-- name: stage_import
-- Apart from the queue, unless imported before (ever) or accepted live within the dedup
-- window (:since).
INSERT INTO imports (source, message_id, user_key, type, body, received_at)
SELECT :source, :message_id, :user_key, :type, :body, :received_at
WHERE NOT EXISTS (
    SELECT 1 FROM imported_ids WHERE source = :source AND message_id = :message_id
) AND NOT EXISTS (
    SELECT 1 FROM dedup WHERE source = :source AND message_id = :message_id AND received_at >= :since
);

-- name: remember_import
-- Imported once, for good (after stage_import, in the same transaction).
INSERT OR IGNORE INTO imported_ids (source, message_id) VALUES (:source, :message_id);

-- name: dedup_import
-- A live call repeating an imported one is not stored again, within the dedup window.
INSERT OR IGNORE INTO dedup (source, message_id, received_at)
VALUES (:source, :message_id, :received_at);

-- name: queue_pages
-- How much of the file is in use, and the most it may take (queue.max_size).
SELECT (SELECT page_count FROM pragma_page_count), (SELECT max_page_count FROM pragma_max_page_count);

-- name: feed_imports
-- The oldest imported messages into the queue, in the order they were imported.
-- Queued as of now: max_age counts from here.
INSERT INTO messages (source, message_id, user_key, type, body, received_at)
SELECT source, message_id, user_key, type, body, :now FROM imports
WHERE id <= :last ORDER BY id;

-- name: fed_imports
DELETE FROM imports WHERE id <= :last;

-- name: import_chunk_end
SELECT MAX(id) FROM (SELECT id FROM imports ORDER BY id LIMIT :limit);

-- name: count_imports
SELECT COUNT(*) FROM imports;
