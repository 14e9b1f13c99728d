-- A gateway's live keys in id order (ListKeys' default order, and its pages): read from
-- the index instead of sorting every key of the gateway (half a second for 250,000 keys).
CREATE INDEX api_keys_live_gateway_id ON api_keys (gateway_id, id) WHERE deleted_at IS NULL;
