-- The PostgreSQL queue's queries, loaded by name by store.py (the only module that runs them).
-- Each query starts with a line "-- name: NAME"; a line "-- fragment: NAME" starts text that
-- queries take in as {NAME}. Rows come in as parameters (arrays, or JSON arrays where asyncpg's
-- encoding of arrays element by element costs), so that a group commit or a settlement is one
-- statement.

-- Messages come in as two parameters (database.message_rows): $1 a JSON array of their small
-- fields, $2 the text[] of their bodies, zipped back together in order.
-- fragment: message_rows
ROWS FROM (
    json_to_recordset($1::json) AS (bucket smallint, source text, message_id text,
                                     user_key text, type text, received_at float8,
                                     fresh bool),
    unnest($2::text[]))
WITH ORDINALITY AS t(bucket, source, message_id, user_key, type, received_at, fresh, body,
                     ord)

-- name: schema_version
SELECT COALESCE(MAX(version), 0) FROM segment_relay_schema;

-- name: schema_exists
SELECT to_regclass('segment_relay_schema') IS NOT NULL;

-- name: insert_calls
-- A group commit without session activity, in one statement: the messageIds new within the
-- dedup window are recorded (a messageId accepted before within the window is left out, also
-- when another relay's transaction has it: the insert waits for that one to end), and the
-- calls with those are stored in acceptance order. A messageId the relay made (`fresh`)
-- cannot repeat one: it gets no dedup row, and its call is stored. Every stored row is joined
-- with the transaction's id, so that the transaction has one before it draws a seq, also
-- when it writes no dedup row (see horizon.py). Dedup rows are inserted sorted, so that two
-- relays' commits cannot deadlock on them. Returns the positions (from 1) of the calls left
-- out as repeats: usually none, so a commit of thousands of calls answers no rows.
WITH xid AS MATERIALIZED (
    SELECT pg_current_xact_id() AS id
), input AS (
    SELECT * FROM {message_rows}
), new AS (
    INSERT INTO dedup AS d (source, message_id, received_at)
    SELECT source, message_id, received_at FROM input WHERE NOT fresh
    ORDER BY source, message_id
    ON CONFLICT (source, message_id) DO UPDATE SET received_at = excluded.received_at
    WHERE d.received_at < excluded.received_at - $3
    RETURNING source, message_id
), stored AS (
    INSERT INTO messages (bucket, source, message_id, user_key, type, body, received_at)
    SELECT i.bucket, i.source, i.message_id, i.user_key, i.type, i.body, i.received_at
    FROM xid, input AS i
    WHERE xid.id IS NOT NULL
      AND (i.fresh
           OR EXISTS (SELECT FROM new WHERE new.source = i.source AND new.message_id = i.message_id))
    ORDER BY i.ord
)
SELECT i.ord FROM input AS i
WHERE NOT i.fresh
  AND NOT EXISTS (SELECT FROM new WHERE new.source = i.source AND new.message_id = i.message_id);

-- name: record_ids
-- The dedup step of insert_calls alone, for a commit with session activity (whose rules need
-- to know which calls are repeats before its rows are made).
INSERT INTO dedup AS d (source, message_id, received_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::float8[]) AS t(source, message_id, received_at)
ORDER BY source, message_id
ON CONFLICT (source, message_id) DO UPDATE SET received_at = excluded.received_at
WHERE d.received_at < excluded.received_at - $4
RETURNING source, message_id;

-- name: insert_messages
-- Joined with the transaction's id, as insert_calls: it has one before the first seq.
WITH xid AS MATERIALIZED (
    SELECT pg_current_xact_id() AS id
)
INSERT INTO messages (bucket, source, message_id, user_key, type, body, received_at)
SELECT bucket, source, message_id, user_key, type, body, received_at
FROM xid, {message_rows}
WHERE xid.id IS NOT NULL
ORDER BY ord;

-- name: lock_users
-- Orders concurrent commits of the same users across relays (a user without a session row
-- has no row to lock yet). Taken in one order, so two commits cannot deadlock.
SELECT pg_advisory_xact_lock(hashtextextended(u, 0)) FROM unnest($1::text[]) AS u ORDER BY u;

-- name: lock_sessions
SELECT user_key, source, started_at, last_activity, expires_at, ids, context
FROM sessions WHERE user_key = ANY($1::text[]) ORDER BY user_key FOR UPDATE;

-- name: save_sessions
INSERT INTO sessions (user_key, bucket, source, started_at, last_activity, expires_at, ids, context)
SELECT * FROM unnest($1::text[], $2::smallint[], $3::text[], $4::float8[], $5::float8[],
                     $6::float8[], $7::text[], $8::text[])
ON CONFLICT (user_key) DO UPDATE SET
    source = excluded.source, started_at = excluded.started_at,
    last_activity = excluded.last_activity, expires_at = excluded.expires_at,
    ids = excluded.ids, context = excluded.context;

-- name: count_messages
SELECT COUNT(*) FROM messages;

-- name: due_messages
-- Due: in a bucket this relay holds (one of $2, which it renewed in time by its own clock,
-- and still its own by the database's: a relay paused past its lease reads nothing of what
-- it lost), after seq $6, its retry time has come, no earlier message of its user waits for
-- a retry, and its user has no batch in flight here ($4). The buckets are one array computed
-- once, so that the plan reads the oldest rows in order whatever the leases' statistics say.
-- The bucket comes last: the caller stamps each row with its lease's epoch.
-- Every row starts with what horizon.py needs to know how far the read saw everything (the
-- snapshot's xmin, a transaction id of the read's own when $7, and the sequence's last value)
-- and the count of dead letters ever replayed (they come back under their old seqs); with no
-- message due, only those come back.
WITH horizon AS (
    SELECT pg_snapshot_xmin(s)::text::bigint AS xmin,
           CASE WHEN $7 THEN pg_current_xact_id()::text::bigint END AS xid,
           (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM messages_seq_seq)
               AS allocated,
           (SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'replayed')::bigint
               AS replayed
    FROM pg_current_snapshot() AS s
)
SELECT h.xmin, h.xid, h.allocated, h.replayed, d.*
FROM horizon AS h LEFT JOIN LATERAL (
    SELECT m.seq, m.source, m.message_id, m.user_key, m.type, m.body, m.received_at,
           m.attempts, m.next_attempt_at, m.first_attempt_at, m.last_error, m.bucket
    FROM messages AS m
    WHERE m.bucket = ANY(ARRAY(
            SELECT bucket FROM leases
            WHERE owner = $1 AND expires_at > now() AND bucket = ANY($2::smallint[])))
      AND m.seq > $6
      AND m.next_attempt_at <= $3
      AND NOT (m.user_key = ANY(ARRAY(SELECT unnest($4::text[]))))
      AND NOT EXISTS (
          SELECT 1 FROM messages AS earlier
          WHERE earlier.user_key = m.user_key AND earlier.seq < m.seq
            AND earlier.next_attempt_at > 0 AND earlier.next_attempt_at > $3
      )
    ORDER BY m.seq
    LIMIT $5
) AS d ON true
ORDER BY d.seq;

-- name: dead_rows
-- The queue's tables with more than $1 dead rows (the statistics autovacuum reads too).
SELECT relname FROM pg_stat_user_tables
WHERE relname IN ('messages', 'sessions', 'dedup', 'leases', 'counters', 'instances',
                  'dead_letters', 'imports')
  AND schemaname = current_schema() AND n_dead_tup > $1
ORDER BY relname;

-- name: analyze
-- At start: a queue that holds a backlog is planned on its current size at once (otherwise
-- autovacuum's next round, up to a minute later, and until then the due query may sort the
-- whole table instead of reading the oldest rows in order).
ANALYZE messages, sessions, leases;

-- name: next_retry_at
SELECT MIN(next_attempt_at) FROM messages WHERE next_attempt_at > 0 AND bucket = ANY($1::smallint[]);

-- name: fence
-- The buckets whose lease is still this relay's under the given epochs, locked until the
-- transaction ends so that no other relay can take them over meanwhile. KEY SHARE blocks a
-- takeover or release (they lock FOR UPDATE) but not this relay's renewals (FOR NO KEY
-- UPDATE), which so never wait for a settlement.
SELECT l.bucket, l.epoch FROM leases AS l
JOIN unnest($2::smallint[], $3::bigint[]) AS c(bucket, epoch) ON c.bucket = l.bucket
WHERE l.owner = $1 AND l.epoch = c.epoch
ORDER BY l.bucket
FOR KEY SHARE OF l;

-- name: settle
-- The outcome of a send, in one statement (one round trip, its own transaction): each
-- claimed message ($2, a JSON array of objects: PostgresQueue.settle) is acked ('a',
-- deleted), retried ('r', rescheduled) or buried ('d', moved to the dead letters), but only
-- while the lease it was claimed under is still this relay's ($1): `fence` locks those
-- leases until the statement commits, so no relay takes them over meanwhile. The project's
-- new names and the counters are added with it. All parts see the rows as they were before
-- the statement (one snapshot): the dead letters are copied from the rows the same statement
-- deletes. Returns how many messages were settled.
WITH claims AS (
    SELECT * FROM ROWS FROM (
        json_to_recordset($2::json) AS (seq bigint, bucket smallint, lease bigint, outcome text,
                                        at float8, error text, counts int, reason text,
                                        detail text, status int, response text))
    WITH ORDINALITY
    AS c(seq, bucket, lease, outcome, at, error, counts, reason, detail, status, response, ord)
), fence AS (
    SELECT l.bucket, l.epoch FROM leases AS l
    WHERE l.owner = $1 AND l.bucket = ANY(ARRAY(SELECT DISTINCT bucket FROM claims))
    ORDER BY l.bucket
    FOR KEY SHARE  -- see fence
), mine AS (
    SELECT c.* FROM claims AS c JOIN fence AS f ON f.bucket = c.bucket AND f.epoch = c.lease
), buried AS (
    INSERT INTO dead_letters (seq, bucket, source, message_id, user_key, type, body, received_at,
                              reason, detail, response_status, response_body, attempts,
                              first_attempt_at, last_attempt_at)
    SELECT m.seq, m.bucket, m.source, m.message_id, m.user_key, m.type, m.body, m.received_at,
           d.reason, d.detail, d.status, d.response, m.attempts + 1,
           COALESCE(m.first_attempt_at, $3), $3
    FROM mine AS d JOIN messages AS m ON m.seq = d.seq
    WHERE d.outcome = 'd'
    ORDER BY d.ord
), gone AS (
    DELETE FROM messages AS m USING mine AS d
    WHERE m.seq = d.seq AND d.outcome IN ('a', 'd')
), moved AS (
    UPDATE messages AS m
    SET next_attempt_at = r.at, last_error = r.error, attempts = m.attempts + r.counts,
        first_attempt_at = COALESCE(m.first_attempt_at, $3)
    FROM mine AS r
    WHERE m.seq = r.seq AND r.outcome = 'r'
), named AS (
    INSERT INTO project_names (kind, name)
    SELECT * FROM unnest($4::text[], $5::text[]) ON CONFLICT DO NOTHING
), counted AS (
    INSERT INTO counters (name, owner, value)
    SELECT n, $1, v FROM unnest($6::text[], $7::bigint[]) AS t(n, v)
    ON CONFLICT (name, owner) DO UPDATE SET value = counters.value + excluded.value
)
SELECT COUNT(*) FILTER (WHERE outcome IN ('a', 'd')), COUNT(*) FROM mine;

-- name: project_names
SELECT kind, name FROM project_names;

-- name: prune_dedup
DELETE FROM dedup WHERE received_at < $1;

-- name: expired_sessions
-- Sessions idle at $3 in the buckets this relay holds (fenced by the caller); a session a
-- commit is extending now is skipped, and closed at a later tick if still idle.
SELECT user_key, source, started_at, last_activity, expires_at, ids, context, bucket
FROM sessions WHERE bucket = ANY($1::smallint[]) AND expires_at <= $2
ORDER BY expires_at LIMIT $3
FOR UPDATE SKIP LOCKED;

-- name: delete_sessions
DELETE FROM sessions WHERE user_key = ANY($1::text[]);

-- name: next_session_expiry
SELECT MIN(expires_at) FROM sessions WHERE bucket = ANY($1::smallint[]);

-- name: session_stats
SELECT (SELECT COUNT(*) FROM sessions),
       (SELECT MIN(expires_at) FROM sessions WHERE bucket = ANY($1::smallint[]));

-- name: queue_stats
SELECT COUNT(*), COUNT(*) FILTER (WHERE next_attempt_at > $1), MIN(received_at) FROM messages;

-- name: dead_letter_counts
SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason;

-- name: counters
SELECT name, SUM(value)::bigint FROM counters GROUP BY name;

-- name: dead_letters
SELECT id, seq, source, message_id, user_key, type, body, received_at, reason, detail,
       response_status, response_body, attempts, first_attempt_at, last_attempt_at
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1) AND id > $2
ORDER BY id LIMIT $3;

-- name: dead_letter
SELECT id, seq, source, message_id, user_key, type, body, received_at, reason, detail,
       response_status, response_body, attempts, first_attempt_at, last_attempt_at
FROM dead_letters WHERE id = $1;

-- name: replay
-- A replayed dead letter goes back under its original seq, so it keeps its place in its
-- user's order; its attempts and its max_age clock start again.
-- The replays are counted (by $3, as the other counters): a forwarder that skips what its
-- earlier reads saw reads from the start again when the count changes.
-- One refused at ingest has no seq (0): once fixed, it takes a new one; until then, it stays.
WITH moved AS (
    DELETE FROM dead_letters
    WHERE id = ANY($1::bigint[]) AND reason NOT IN ('invalid', 'too_large')
    RETURNING seq, bucket, source, message_id, user_key, type, body
), counted AS (
    INSERT INTO counters (name, owner, value)
    SELECT 'replayed', $3, COUNT(*) FROM moved HAVING COUNT(*) > 0
    ON CONFLICT (name, owner) DO UPDATE SET value = counters.value + excluded.value
)
INSERT INTO messages (seq, bucket, source, message_id, user_key, type, body, received_at)
SELECT COALESCE(NULLIF(seq, 0), nextval('messages_seq_seq')), bucket, source, message_id,
       user_key, type, body, $2
FROM moved ORDER BY seq;

-- name: insert_refused
-- Messages refused at ingest (records.Refusal, column by column): no seq, never attempted.
INSERT INTO dead_letters (bucket, seq, source, message_id, user_key, type, body, received_at,
                          reason, detail, attempts, last_attempt_at)
SELECT bucket, 0, source, message_id, user_key, type, body, received_at, reason, detail, 0,
       received_at
FROM unnest($1::smallint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::float8[], $8::text[], $9::text[])
    AS t(bucket, source, message_id, user_key, type, body, received_at, reason, detail);

-- name: fix_dead_letter
UPDATE dead_letters
SET bucket = $2, message_id = $3, user_key = $4, type = $5, body = $6, reason = 'fixed',
    detail = $7, response_status = NULL, response_body = NULL
WHERE id = $1;

-- name: purge_dead_letters
DELETE FROM dead_letters WHERE last_attempt_at < $1;

-- name: join
-- This relay joins (or renews its membership), on the database's clock.
INSERT INTO instances (id, host, pid, forwarding, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
ON CONFLICT (id) DO UPDATE SET seen_at = now(), expires_at = excluded.expires_at;

-- name: leave
-- A relay that stops gives its buckets up at once, so that the others need not wait for the
-- leases to run out.
WITH gone AS (DELETE FROM instances WHERE id = $1)
UPDATE leases SET owner = NULL, expires_at = '-infinity'
WHERE bucket IN (SELECT bucket FROM leases WHERE owner = $1 ORDER BY bucket FOR UPDATE);

-- name: renew
-- Leases are locked in bucket order, as every fence locks them, and FOR NO KEY UPDATE,
-- which a fence's KEY SHARE does not block (see fence).
UPDATE leases SET expires_at = now() + make_interval(secs => $2)
WHERE bucket IN (
    SELECT bucket FROM leases WHERE owner = $1 ORDER BY bucket FOR NO KEY UPDATE
) AND owner = $1
RETURNING bucket, epoch;

-- name: forwarders
-- How many live relays share the buckets.
SELECT COUNT(*) FROM instances WHERE forwarding AND expires_at > now();

-- name: acquire
-- Up to $3 buckets that no live relay holds (free, or not renewed in time) become this
-- relay's, each under a new epoch.
UPDATE leases AS l
SET owner = $1, epoch = l.epoch + 1, expires_at = now() + make_interval(secs => $2)
WHERE l.bucket IN (
    SELECT bucket FROM leases
    WHERE owner IS NULL OR expires_at <= now()
    ORDER BY bucket LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING l.bucket, l.epoch;

-- name: release
UPDATE leases SET owner = NULL, expires_at = '-infinity'
WHERE bucket IN (
    SELECT bucket FROM leases WHERE owner = $1 AND bucket = ANY($2::smallint[])
    ORDER BY bucket FOR UPDATE
);

-- name: instances
SELECT i.id, i.host, i.pid, extract(epoch FROM i.started_at)::float8,
       extract(epoch FROM i.seen_at)::float8,
       COALESCE(array_agg(l.bucket ORDER BY l.bucket)
                FILTER (WHERE l.bucket IS NOT NULL), '{}'),
       i.forwarding
FROM instances AS i
LEFT JOIN leases AS l ON l.owner = i.id AND l.expires_at > now()
WHERE i.expires_at > now()
GROUP BY i.id ORDER BY i.started_at, i.id;

-- name: note_destination
UPDATE instances SET destination = $2 WHERE id = $1;

-- name: destinations
SELECT id, destination FROM instances
WHERE expires_at > now() AND destination IS NOT NULL ORDER BY started_at, id;

-- name: retry_now
-- Messages waiting for a retry, due now (`segment-relay retry-now`), in every relay's buckets.
-- Counted as replays (by $1): they are due again below what the forwarders' reads covered.
WITH due AS (
    UPDATE messages SET next_attempt_at = 0 WHERE next_attempt_at > $2 RETURNING 1
), counted AS (
    INSERT INTO counters (name, owner, value)
    SELECT 'replayed', $1, COUNT(*) FROM due HAVING COUNT(*) > 0
    ON CONFLICT (name, owner) DO UPDATE SET value = counters.value + excluded.value
)
SELECT COUNT(*) FROM due;

-- name: stage_imports
-- Imported messages apart from the queue, in their order. A messageId imported before (for
-- good), repeated in the input, or accepted live within the dedup window ($3) is left out.
-- Returns how many were staged.
WITH input AS (
    SELECT * FROM {message_rows}
), first AS (
    SELECT DISTINCT ON (source, message_id) * FROM input ORDER BY source, message_id, ord
), new AS (
    INSERT INTO imported_ids (source, message_id)
    SELECT source, message_id FROM first ORDER BY source, message_id
    ON CONFLICT DO NOTHING
    RETURNING source, message_id
), staged AS (
    INSERT INTO imports (bucket, source, message_id, user_key, type, body, received_at)
    SELECT f.bucket, f.source, f.message_id, f.user_key, f.type, f.body, f.received_at
    FROM first AS f JOIN new USING (source, message_id)
    WHERE NOT EXISTS (
        SELECT 1 FROM dedup AS d
        WHERE d.source = f.source AND d.message_id = f.message_id AND d.received_at >= $3
    )
    ORDER BY f.ord
    RETURNING 1
), live AS (
    -- A live call repeating an imported one is not stored again, within the dedup window.
    INSERT INTO dedup (source, message_id, received_at)
    SELECT source, message_id, $4 FROM new ORDER BY source, message_id
    ON CONFLICT (source, message_id) DO NOTHING
)
SELECT COUNT(*) FROM staged;

-- name: feed_imports
-- The oldest imported messages into the queue, in the order they were imported; relays
-- feeding at once take different ones. The transaction has its id before (see Horizon).
WITH moved AS (
    DELETE FROM imports
    WHERE id IN (SELECT id FROM imports ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING id, bucket, source, message_id, user_key, type, body, received_at
)
-- Queued as of now ($2): max_age counts from here.
INSERT INTO messages (bucket, source, message_id, user_key, type, body, received_at)
SELECT bucket, source, message_id, user_key, type, body, $2 FROM moved ORDER BY id;

-- name: take_xid
SELECT pg_current_xact_id();

-- name: count_imports
SELECT COUNT(*) FROM imports;
