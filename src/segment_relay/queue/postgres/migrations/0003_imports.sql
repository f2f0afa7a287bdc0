-- Version 3: backfill (docs/operations.md, "Importing archives"). Imported messages wait here,
-- apart from the queue, and the relays move them into it only while live calls are not
-- waiting; `imported_ids` remembers every messageId imported, for good, so that importing a
-- file again queues nothing.
CREATE TABLE imports (
    id bigserial PRIMARY KEY,
    bucket smallint NOT NULL,
    source text NOT NULL,
    message_id text NOT NULL,
    user_key text NOT NULL,
    type text NOT NULL,
    body text NOT NULL,
    received_at double precision NOT NULL  -- when it was imported (max_age counts from there)
);

CREATE TABLE imported_ids (
    source text NOT NULL,
    message_id text NOT NULL,
    PRIMARY KEY (source, message_id)
);
