-- Usage over time: each key's requests, tokens and cost per hour and model, added up from
-- every replica's increments (GetUsageHistory; the console's charts). Rows older than
-- --usage-history-retention are deleted hourly.
CREATE TABLE usage_buckets (
    key_id            TEXT NOT NULL REFERENCES api_keys (id),
    gateway_id        TEXT NOT NULL,
    hour              BIGINT NOT NULL,
    model             TEXT NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost_micros       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, hour, model)
);
CREATE INDEX usage_buckets_gateway ON usage_buckets (gateway_id, hour);
CREATE INDEX usage_buckets_hour ON usage_buckets (hour);
