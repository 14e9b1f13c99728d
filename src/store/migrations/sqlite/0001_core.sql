-- Gateways, API keys and management tokens. Timestamps are unix microseconds (UTC).
CREATE TABLE gateways (
    id                         TEXT PRIMARY KEY,
    name                       TEXT NOT NULL,
    key_name                   TEXT NOT NULL,
    key_location               TEXT NOT NULL CHECK (key_location IN ('header', 'query')),
    upstream_header            TEXT,
    upstream_value             TEXT,
    default_reservation_tokens INTEGER NOT NULL DEFAULT 0 CHECK (default_reservation_tokens >= 0),
    created_at                 INTEGER NOT NULL,
    deleted_at                 INTEGER
);
-- Names are unique among live gateways; a deleted gateway's name can be reused.
CREATE UNIQUE INDEX gateways_live_name ON gateways (name) WHERE deleted_at IS NULL;

CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY,
    gateway_id          TEXT NOT NULL REFERENCES gateways (id),
    name                TEXT NOT NULL,
    secret_hash         BLOB NOT NULL UNIQUE,
    prefix              TEXT NOT NULL,
    enabled             INTEGER NOT NULL,
    legacy              INTEGER NOT NULL DEFAULT 0,
    cost_limit_micros   INTEGER,
    token_limit         INTEGER,
    requests_per_minute INTEGER,
    reset_period        TEXT NOT NULL DEFAULT 'never'
                        CHECK (reset_period IN ('never', 'daily', 'weekly', 'monthly')),
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER,
    last_used_at        INTEGER,
    -- Deleted keys never authenticate again; the row stays for usage history and audit.
    deleted_at          INTEGER
);
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (gateway_id, name) WHERE deleted_at IS NULL;

CREATE TABLE access_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    secret_hash  BLOB NOT NULL UNIQUE,
    role         TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'developer')),
    -- JSON array of gateway names; empty means every gateway.
    gateways     TEXT NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
