-- Usage per key and period (absolute totals, written by the usage flusher), model prices,
-- the previous secret of a rotated key, and the last denial of each key.
CREATE TABLE key_usage (
    key_id            TEXT NOT NULL REFERENCES api_keys (id),
    period_start      INTEGER NOT NULL,
    reset_period      TEXT NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros       INTEGER NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (key_id, period_start)
);

CREATE TABLE model_prices (
    model                     TEXT PRIMARY KEY,
    input_micros_per_million  INTEGER NOT NULL CHECK (input_micros_per_million >= 0),
    output_micros_per_million INTEGER NOT NULL CHECK (output_micros_per_million >= 0),
    updated_at                INTEGER NOT NULL
);

ALTER TABLE api_keys ADD COLUMN previous_secret_hash BLOB;
ALTER TABLE api_keys ADD COLUMN previous_valid_until INTEGER;
ALTER TABLE api_keys ADD COLUMN last_denied_at INTEGER;
ALTER TABLE api_keys ADD COLUMN last_deny_reason TEXT;
