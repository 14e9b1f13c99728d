-- Replicas on one database follow each other's changes (sync.rs). Every row the
-- in-memory view depends on carries:
--   version: from one sequence, bumped on every insert and every change the view sees;
--            orders changes and is what `portcullis_view_version` reports;
--   txid:    the writing transaction (pg_current_xact_id, 64-bit, never wraps): a reader
--            re-reads from the oldest transaction still running when it last read, because
--            sequence values commit out of order (see rows::changes).
-- Both are set by triggers, so no query has to remember them; the same triggers NOTIFY
-- portcullis_changes, which is delivered at commit and only wakes readers.
CREATE SEQUENCE portcullis_change_version;

CREATE FUNCTION portcullis_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('portcullis_change_version');
    NEW.txid := CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT);
    PERFORM pg_notify('portcullis_changes', '');
    RETURN NEW;
END
$$;

ALTER TABLE gateways ADD COLUMN version BIGINT NOT NULL DEFAULT nextval('portcullis_change_version');
ALTER TABLE gateways ADD COLUMN txid BIGINT NOT NULL DEFAULT 0;
CREATE INDEX gateways_txid ON gateways (txid);
CREATE TRIGGER gateways_inserted BEFORE INSERT ON gateways
    FOR EACH ROW EXECUTE FUNCTION portcullis_changed();
CREATE TRIGGER gateways_updated BEFORE UPDATE ON gateways
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION portcullis_changed();

ALTER TABLE api_keys ADD COLUMN version BIGINT NOT NULL DEFAULT nextval('portcullis_change_version');
ALTER TABLE api_keys ADD COLUMN txid BIGINT NOT NULL DEFAULT 0;
CREATE INDEX api_keys_txid ON api_keys (txid);
CREATE TRIGGER api_keys_inserted BEFORE INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION portcullis_changed();
-- Only the columns the view reads: last use and last denial are written by every usage
-- flush (each second) and must not make every replica re-read every active key.
-- A new column the view reads must be added here.
CREATE TRIGGER api_keys_updated BEFORE UPDATE ON api_keys
    FOR EACH ROW WHEN ((OLD.gateway_id, OLD.name, OLD.secret_hash, OLD.prefix, OLD.enabled, OLD.legacy,
                        OLD.cost_limit_micros, OLD.token_limit, OLD.requests_per_minute, OLD.reset_period,
                        OLD.expires_at, OLD.deleted_at, OLD.previous_secret_hash, OLD.previous_valid_until)
                       IS DISTINCT FROM
                       (NEW.gateway_id, NEW.name, NEW.secret_hash, NEW.prefix, NEW.enabled, NEW.legacy,
                        NEW.cost_limit_micros, NEW.token_limit, NEW.requests_per_minute, NEW.reset_period,
                        NEW.expires_at, NEW.deleted_at, NEW.previous_secret_hash, NEW.previous_valid_until))
    EXECUTE FUNCTION portcullis_changed();

-- Every column, last use included: it is written at most once a minute per token, and
-- other replicas need it for the idle timeout.
ALTER TABLE access_tokens ADD COLUMN version BIGINT NOT NULL DEFAULT nextval('portcullis_change_version');
ALTER TABLE access_tokens ADD COLUMN txid BIGINT NOT NULL DEFAULT 0;
CREATE INDEX access_tokens_txid ON access_tokens (txid);
CREATE TRIGGER access_tokens_inserted BEFORE INSERT ON access_tokens
    FOR EACH ROW EXECUTE FUNCTION portcullis_changed();
CREATE TRIGGER access_tokens_updated BEFORE UPDATE ON access_tokens
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION portcullis_changed();

ALTER TABLE model_prices ADD COLUMN version BIGINT NOT NULL DEFAULT nextval('portcullis_change_version');
ALTER TABLE model_prices ADD COLUMN txid BIGINT NOT NULL DEFAULT 0;
CREATE INDEX model_prices_txid ON model_prices (txid);
CREATE TRIGGER model_prices_inserted BEFORE INSERT ON model_prices
    FOR EACH ROW EXECUTE FUNCTION portcullis_changed();
CREATE TRIGGER model_prices_updated BEFORE UPDATE ON model_prices
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION portcullis_changed();

-- Prices are deleted for real (list_prices stays as it is); a deletion leaves a tombstone
-- for the other replicas, which setting the price again removes.
CREATE TABLE model_price_deletions (
    model   TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    txid    BIGINT NOT NULL
);
CREATE INDEX model_price_deletions_txid ON model_price_deletions (txid);
CREATE TRIGGER model_price_deletions_changed BEFORE INSERT OR UPDATE ON model_price_deletions
    FOR EACH ROW EXECUTE FUNCTION portcullis_changed();

CREATE FUNCTION portcullis_price_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO model_price_deletions (model, version, txid) VALUES (OLD.model, 0, 0)
        ON CONFLICT (model) DO UPDATE SET version = 0;
    RETURN OLD;
END
$$;
CREATE TRIGGER model_prices_deleted AFTER DELETE ON model_prices
    FOR EACH ROW EXECUTE FUNCTION portcullis_price_deleted();

CREATE FUNCTION portcullis_price_set() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM model_price_deletions WHERE model = NEW.model;
    RETURN NEW;
END
$$;
CREATE TRIGGER model_prices_set AFTER INSERT ON model_prices
    FOR EACH ROW EXECUTE FUNCTION portcullis_price_set();
