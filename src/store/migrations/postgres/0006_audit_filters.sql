-- The audit trail's filters (the console, `portcullis audit`): by action (or a service's
-- actions, a prefix), by target, by actor (token id or name), newest first.
CREATE INDEX audit_events_action_at ON audit_events (action, at);
CREATE INDEX audit_events_target_at ON audit_events (target, at);
CREATE INDEX audit_events_token_id_at ON audit_events (token_id, at);
CREATE INDEX audit_events_token_name_at ON audit_events (token_name, at);
