-- Every gateway process (a worker of a node) that uses this database, and
-- until when it is alive. A process renews `lease_until` every third of
-- `[state] lease_time`; one whose lease has passed is dead, whatever it may
-- still believe: its mailbox locks are free and its in-flight spool messages
-- may be taken over. Locks and leases name their holder by `process`.
CREATE TABLE gateway_processes (
    process     text PRIMARY KEY,           -- "node:pid:random", unique per start
    node        text NOT NULL,              -- [state] node, or the host name
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL
);
CREATE INDEX gateway_processes_lease ON gateway_processes (lease_until);
