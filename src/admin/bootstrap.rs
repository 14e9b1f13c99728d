//! Start-up access: the bootstrap token (`PORTCULLIS_BOOTSTRAP_TOKEN`) or, on a fresh
//! database, a first owner token printed once.

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::access::{AuditEvent, validate_bootstrap_secret};
use crate::domain::secret::{Secret, SecretKind};
use crate::domain::tokens::{StoredToken, TokenRegistry};
use crate::store::{Store, StoreError};

/// The audit trail's name for what start-up does on the variable's behalf.
const BOOTSTRAP_ACTOR: &str = "PORTCULLIS_BOOTSTRAP_TOKEN";

/// Makes sure someone can administer this instance. With `bootstrap` (the variable's
/// value): an owner token with that secret exists, usable, unscoped and without a display
/// prefix, and a bootstrap token made with an earlier value is revoked (audited). Without
/// it, when no owner token was ever made and `first_owner` is set: one is made and its
/// secret printed once on stderr.
pub async fn ensure_access(
    store: &dyn Store,
    tokens: &mut TokenRegistry,
    bootstrap: Option<&str>,
    first_owner: bool,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let Some(secret) = bootstrap else {
        if first_owner && !tokens.has_owner() {
            create_first_owner(store, tokens, now).await?;
        }
        return Ok(());
    };
    // The message names the rule, never the value.
    if let Err(e) = validate_bootstrap_secret(secret) {
        bail!("{e}");
    }
    let hash = Secret::from_plaintext(secret).hash();
    match tokens.get(&hash).cloned() {
        None => {
            let stored = StoredToken::bootstrap(hash, now);
            match store.insert_access_token(&stored).await {
                Ok(()) => {
                    tracing::info!(token_id = %stored.token.id, "bootstrap owner token stored");
                    tokens.insert(stored);
                }
                // Another replica starting at the same time stored it first: take theirs.
                Err(StoreError::AlreadyExists(_)) => {
                    let theirs = store.load().await.context("loading the bootstrap token another replica stored")?;
                    let found = theirs.access_tokens.into_iter().find(|t| t.hash == hash);
                    let Some(found) = found else { bail!("the bootstrap token was stored and is gone again") };
                    tokens.insert(found);
                }
                Err(e) => return Err(anyhow::Error::new(e).context("storing the bootstrap token")),
            }
        }
        Some(mut stored) => {
            if stored.needs_restoring() {
                store.restore_owner_token(&hash).await.context("restoring the bootstrap token")?;
                if stored.narrowed() {
                    // The variable says this secret is an owner: make it one again.
                    tracing::warn!(token_id = %stored.token.id, "the bootstrap token was revoked, expired or narrowed; restored as an owner (unset PORTCULLIS_BOOTSTRAP_TOKEN to stop restoring it, or set another value to retire it)");
                }
                stored.restore_as_bootstrap();
                tokens.insert(stored);
            }
        }
    }
    retire_previous(store, tokens, &hash, now).await?;
    // Starting with the variable set counts as using the token.
    tokens.touch(&hash, now);
    Ok(())
}

/// Revokes every bootstrap token but the current one: a changed variable retires the
/// secret it replaced.
async fn retire_previous(
    store: &dyn Store,
    tokens: &mut TokenRegistry,
    current: &crate::domain::secret::SecretHash,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let previous = tokens.previous_bootstrap(current);
    for id in previous {
        store.revoke_access_token(id, now).await.context("retiring the previous bootstrap token")?;
        tokens.revoke(id, now);
        let event = AuditEvent {
            id: Uuid::now_v7(),
            at: now,
            token_id: None,
            token_name: BOOTSTRAP_ACTOR.into(),
            action: "Bootstrap/RevokeAccessToken".into(),
            gateway: None,
            target: id.to_string(),
            result: "OK".into(),
        };
        store.insert_audit(&event).await.context("auditing the retired bootstrap token")?;
        tracing::warn!(token_id = %id, "PORTCULLIS_BOOTSTRAP_TOKEN changed: the previous bootstrap token is revoked");
    }
    Ok(())
}

async fn create_first_owner(store: &dyn Store, tokens: &mut TokenRegistry, now: DateTime<Utc>) -> anyhow::Result<()> {
    let secret = Secret::generate(SecretKind::AccessToken);
    let stored = StoredToken::owner("owner", secret.hash(), secret.display_prefix(), false, now);
    store.insert_access_token(&stored).await.context("storing the first owner token")?;
    tokens.insert(stored);
    // Printed once, on stderr, never logged.
    eprintln!(
        "\nPortcullis created the first owner management token. It is shown only this once; store it now:\n\n    {}\n\nUse it as `authorization: Bearer <token>` (or PORTCULLIS_TOKEN for the CLI).\n",
        secret.expose()
    );
    Ok(())
}
