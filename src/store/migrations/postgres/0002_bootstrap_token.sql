-- The token PORTCULLIS_BOOTSTRAP_TOKEN made is marked, so that starting with another value
-- retires it, and it keeps no display prefix (its first characters belong to a secret the
-- operator chose). Tokens made by earlier versions carry the name they were made with.
ALTER TABLE access_tokens ADD COLUMN bootstrap BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE access_tokens SET bootstrap = TRUE, prefix = '' WHERE name = 'bootstrap' AND role = 'owner' AND gateways = '[]';
