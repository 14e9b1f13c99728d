-- Old audit events are deleted by time (--audit-retention).
CREATE INDEX audit_events_at ON audit_events (at);
