-- Portcullis on PostgreSQL: the same tables as the SQLite migrations 0001-0003.
-- Timestamps are unix microseconds (UTC), ids are UUIDv7 text, secrets only as SHA-256.
CREATE TABLE gateways (
    id                         TEXT PRIMARY KEY,
    name                       TEXT NOT NULL,
    key_name                   TEXT NOT NULL,
    key_location               TEXT NOT NULL CHECK (key_location IN ('header', 'query')),
    upstream_header            TEXT,
    upstream_value             TEXT,
    default_reservation_tokens BIGINT NOT NULL DEFAULT 0 CHECK (default_reservation_tokens >= 0),
    created_at                 BIGINT NOT NULL,
    deleted_at                 BIGINT
);
CREATE UNIQUE INDEX gateways_live_name ON gateways (name) WHERE deleted_at IS NULL;

CREATE TABLE api_keys (
    id                   TEXT PRIMARY KEY,
    gateway_id           TEXT NOT NULL REFERENCES gateways (id),
    name                 TEXT NOT NULL,
    secret_hash          BYTEA NOT NULL UNIQUE,
    prefix               TEXT NOT NULL,
    enabled              BOOLEAN NOT NULL,
    legacy               BOOLEAN NOT NULL DEFAULT FALSE,
    cost_limit_micros    BIGINT,
    token_limit          BIGINT,
    requests_per_minute  BIGINT,
    reset_period         TEXT NOT NULL DEFAULT 'never'
                         CHECK (reset_period IN ('never', 'daily', 'weekly', 'monthly')),
    created_at           BIGINT NOT NULL,
    expires_at           BIGINT,
    last_used_at         BIGINT,
    deleted_at           BIGINT,
    previous_secret_hash BYTEA,
    previous_valid_until BIGINT,
    last_denied_at       BIGINT,
    last_deny_reason     TEXT
);
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (gateway_id, name) WHERE deleted_at IS NULL;

CREATE TABLE access_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    secret_hash  BYTEA NOT NULL UNIQUE,
    prefix       TEXT NOT NULL DEFAULT '',
    role         TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'developer')),
    gateways     TEXT NOT NULL DEFAULT '[]',
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT,
    revoked_at   BIGINT
);

CREATE TABLE key_usage (
    key_id            TEXT NOT NULL REFERENCES api_keys (id),
    period_start      BIGINT NOT NULL,
    reset_period      TEXT NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost_micros       BIGINT NOT NULL DEFAULT 0,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (key_id, period_start)
);

CREATE TABLE model_prices (
    model                     TEXT PRIMARY KEY,
    input_micros_per_million  BIGINT NOT NULL CHECK (input_micros_per_million >= 0),
    output_micros_per_million BIGINT NOT NULL CHECK (output_micros_per_million >= 0),
    updated_at                BIGINT NOT NULL
);

CREATE TABLE audit_events (
    id         TEXT PRIMARY KEY,
    at         BIGINT NOT NULL,
    token_id   TEXT,
    token_name TEXT NOT NULL DEFAULT '',
    action     TEXT NOT NULL,
    gateway    TEXT,
    target     TEXT NOT NULL DEFAULT '',
    result     TEXT NOT NULL
);
CREATE INDEX audit_events_gateway ON audit_events (gateway, id);
