-- One row per mailbox held by a POP3 session (RFC 1939's exclusive
-- maildrop), on any node. `mailbox` is the gateway's mailbox key (provider,
-- upstream user, folder) as a JSON list. The holder is `process` (see
-- gateway_processes): a row whose process has no live lease is free to take
-- over, so a dead node's locks last at most [state] lease_time. `token`
-- names the one session holding it, so a late release never frees a lock
-- that another session of the same process took since.
CREATE TABLE gateway_mailbox_locks (
    mailbox     text PRIMARY KEY,
    process     text NOT NULL,
    label       text NOT NULL,              -- the device, for log lines
    token       text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gateway_mailbox_locks_process ON gateway_mailbox_locks (process);
