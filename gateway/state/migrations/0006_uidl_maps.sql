-- The UIDL map of IMAP-backed accounts (gateway.maildrop.uidl_map): which
-- folder and UIDVALIDITY the map is of, and the UIDL given to each message
-- with what identifies it whatever its UID (Message-ID, size, INTERNALDATE),
-- so a UIDVALIDITY change keeps the UIDLs of messages that match. Changed
-- only under pg_advisory_xact_lock(0x7569646C, hashtext(account)).
CREATE TABLE gateway_uidl_mailboxes (
    account     text PRIMARY KEY,
    folder      text NOT NULL,
    uidvalidity bigint NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE gateway_uidl_messages (
    account      text NOT NULL,
    uid          bigint NOT NULL,
    uidl         text NOT NULL,
    message_id   text NOT NULL,
    size         bigint NOT NULL,
    internaldate text NOT NULL,
    PRIMARY KEY (account, uid),
    UNIQUE (account, uidl)
);
-- Exact POP3 sizes of Graph messages by immutable id (gateway.maildrop.graph_sizes),
-- forgotten when not seen for 30 days.
CREATE TABLE gateway_graph_sizes (
    account text NOT NULL,
    message text NOT NULL,
    octets  bigint NOT NULL,
    seen    timestamptz NOT NULL,
    PRIMARY KEY (account, message)
);
