-- The web console's sessions, shared by every node (gateway.admin.console.sessions):
-- a login on one node behind the load balancer holds on the others. The
-- cookie's id is never stored, only its SHA-256 digest. Times are the
-- gateway's clock (Unix seconds); a session unused for [admin] session_idle
-- seconds is over (deleted when next seen, or when a new one is opened).
CREATE TABLE gateway_console_sessions (
    token_hash  bytea PRIMARY KEY,
    csrf        text NOT NULL,
    admin       text,                       -- NULL before the login
    created_at  double precision NOT NULL,
    last_seen   double precision NOT NULL,
    notices     text[] NOT NULL DEFAULT '{}' -- what the next page says once
);
CREATE INDEX gateway_console_sessions_seen ON gateway_console_sessions (last_seen);
