-- Login penalties shared by every gateway process (gateway.penalties.shared):
-- what each process saw, appended as it happens, read by the others every
-- second and replayed into their own books. `book` keeps the device logins'
-- penalties apart from the console's admin logins'. Times are the recording
-- process's clock (Unix seconds), as its book counts them. Nothing here is a
-- secret: addresses, device names (or a digest of an overlong one), times.
CREATE TABLE gateway_penalty_events (
    id       bigserial PRIMARY KEY,
    book     text NOT NULL,
    process  text NOT NULL,                 -- gateway_processes.process of the recorder
    kind     text NOT NULL CHECK (kind IN ('failure', 'success', 'lockout')),
    at       double precision NOT NULL,
    network  text NOT NULL,                 -- the address, or its IPv6 network
    name     text NOT NULL DEFAULT '',      -- the device-name key ('' for a lockout)
    until    double precision               -- lockout: its end; success: pair known until
);
CREATE INDEX gateway_penalty_events_at ON gateway_penalty_events (at);

-- (device, address) pairs that logged in: exempt from the device-wide
-- slowdown of a password spray. Loaded by a process at start.
CREATE TABLE gateway_penalty_known (
    book     text NOT NULL,
    name     text NOT NULL,
    network  text NOT NULL,
    until    double precision NOT NULL,
    PRIMARY KEY (book, name, network)
);
CREATE INDEX gateway_penalty_known_until ON gateway_penalty_known (until);
