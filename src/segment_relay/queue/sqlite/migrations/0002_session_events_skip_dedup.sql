-- Version 2: the relay's own session events are never checked against the dedup table.
-- Before, a client message whose messageId happened to be a session event's
-- ("session_start:<user>:<start>", same source) made the commit drop or refuse the real
-- session event. Only Segment calls record their messageIds (trigger messages_dedup), so only
-- they are checked. A changed trigger is dropped and made again: CREATE TRIGGER IF NOT EXISTS
-- would keep the old one in a queue made by an older release.
DROP TRIGGER IF EXISTS session_commit;

CREATE TRIGGER session_commit INSTEAD OF INSERT ON session_commits
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
    -- The messages are read once: each Segment call is checked for a repeat as it is inserted.
    INSERT INTO messages (source, message_id, user_key, type, body, received_at)
    SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'),
           json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]'),
           json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]')
    FROM json_each(NEW.messages) AS j
    WHERE json_extract(j.value, '$[3]') IN ('session_start', 'session_end')
       OR NOT EXISTS (
        SELECT 1 FROM dedup
        WHERE source = json_extract(j.value, '$[0]') AND message_id = json_extract(j.value, '$[1]')
          AND received_at >= json_extract(j.value, '$[6]')
    ) OR RAISE(ABORT, 'segment-relay: a messageId accepted before');
END;
