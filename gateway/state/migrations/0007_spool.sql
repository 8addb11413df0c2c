-- The SMTP spool shared by every node: one row per accepted message, from
-- the COMMIT of its INSERT (after which, and only after which, the device
-- gets `250`) until it is delivered or deleted. Dead letters stay, with
-- state = 'dead', until an admin retries or deletes them.
--
-- A process delivers a message only while it holds its lease
-- (lease_holder = its gateway_processes.process, lease_until in the
-- future, renewed every [smtp] control_interval). A message whose holder's
-- process lease passed, or whose own lease passed, may be claimed by any
-- other process: a dead node's messages are taken over within lease_time.
CREATE TABLE gateway_spool (
    id           text PRIMARY KEY,            -- sortable by arrival
    account      text NOT NULL,
    node         text NOT NULL,               -- the node that accepted it
    state        text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'dead')),
    envelope     bytea NOT NULL,              -- JSON (gateway.smtp.spool_records.Envelope)
    delivery     bytea NOT NULL,              -- JSON (DeliveryState: attempts, recipients done)
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL,   -- Unix time (the gateway's clock)
    last_error   text NOT NULL DEFAULT '',
    size         bigint NOT NULL,
    message      bytea NOT NULL,
    lease_holder text,
    lease_until  timestamptz,
    -- An admin's retry/delete of a message whose lease a live process
    -- holds: carried out by that process when its attempt is written down.
    request      text CHECK (request IN ('retry', 'delete')),
    accepted_at  timestamptz NOT NULL DEFAULT now()
);
-- Mostly already compressed or short: storing it as is saves CPU at intake.
ALTER TABLE gateway_spool ALTER COLUMN message SET STORAGE EXTERNAL;
CREATE INDEX gateway_spool_due ON gateway_spool (next_attempt) WHERE state = 'queued';
CREATE INDEX gateway_spool_holder ON gateway_spool (lease_holder) WHERE lease_holder IS NOT NULL;
