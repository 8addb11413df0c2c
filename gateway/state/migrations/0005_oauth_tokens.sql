-- OAuth2 token records, one row per account, shared by every node. `blob` is
-- the record sealed with the gateway key (AES-256-GCM, exactly the bytes of
-- an embedded token file): the database never sees a token in the clear.
-- `lineage`, `state` and `last_error` are copies for `gateway state status`
-- and operators; the blob is authoritative. `version` grows at every write,
-- so a node notices another's write with one small query.
--
-- The refresh lease: the process (gateway_processes.process) that is asking
-- the token endpoint for this account, and until when. Another process takes
-- it only once it is free, expired, or its holder is dead (no live row in
-- gateway_processes): one refresh per account across all nodes.
CREATE TABLE gateway_oauth_tokens (
    account       text PRIMARY KEY,
    blob          bytea NOT NULL,
    lineage       text NOT NULL,
    state         text NOT NULL,
    last_error    text,
    version       bigint NOT NULL DEFAULT 1,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    refreshing    text,
    refresh_until timestamptz
);
