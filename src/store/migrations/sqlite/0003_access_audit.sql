-- Management-token display prefix, and the audit trail.
ALTER TABLE access_tokens ADD COLUMN prefix TEXT NOT NULL DEFAULT '';

CREATE TABLE audit_events (
    id         TEXT PRIMARY KEY,            -- UUIDv7: time-ordered
    at         INTEGER NOT NULL,
    token_id   TEXT,
    token_name TEXT NOT NULL DEFAULT '',
    action     TEXT NOT NULL,
    gateway    TEXT,
    target     TEXT NOT NULL DEFAULT '',
    result     TEXT NOT NULL
);
CREATE INDEX audit_events_gateway ON audit_events (gateway, id);
