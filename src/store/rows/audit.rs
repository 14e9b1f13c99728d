//! The audit log of admin calls: appended, listed newest first, pruned oldest first.

use chrono::{DateTime, Utc};
use sqlx::Pool;
use uuid::Uuid;

use super::backend::{Backend, Columns, query};
use super::{Params, get, time, unavailable, uuid};
use crate::domain::access::AuditEvent;
use crate::store::{AuditQuery, StoreError, to_micros};

pub(crate) async fn insert<D: Backend>(pool: &Pool<D>, e: &AuditEvent) -> Result<(), StoreError> {
    query(
        "INSERT INTO audit_events (id, at, token_id, token_name, action, gateway, target, result) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(e.id.to_string())
    .bind(to_micros(e.at))
    .bind(e.token_id.map(|t| t.to_string()))
    .bind(&e.token_name)
    .bind(&e.action)
    .bind(e.gateway.as_deref())
    .bind(&e.target)
    .bind(&e.result)
    .execute(pool)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// Deletes up to `batch` events from before `cutoff`, oldest first; how many it deleted.
pub(crate) async fn prune<D: Backend>(pool: &Pool<D>, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, StoreError> {
    query(
        "DELETE FROM audit_events WHERE id IN \
         (SELECT id FROM audit_events WHERE at < $1 ORDER BY at LIMIT $2)",
    )
    .bind(to_micros(cutoff))
    .bind(i64::from(batch))
    .execute(pool)
    .await
    .map_err(unavailable)
}

/// Events as `q` asks (every filter together), newest first.
pub(crate) async fn search<D: Backend>(pool: &Pool<D>, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
    let mut p = Params::new();
    let mut conds = Vec::new();
    if let Some(g) = &q.gateway {
        conds.push(format!("gateway = {}", p.add(g.clone())));
    }
    if let Some(actor) = &q.actor {
        let (a, b) = (p.add(actor.clone()), p.add(actor.clone()));
        conds.push(format!("(token_id = {a} OR token_name = {b})"));
    }
    match q.action.as_deref() {
        None => {}
        Some(service) if !service.contains('/') => {
            // Service names are letters only: nothing to escape.
            conds.push(format!("action LIKE {}", p.add(format!("{service}/%"))))
        }
        Some(action) => conds.push(format!("action = {}", p.add(action.to_string()))),
    }
    if let Some(t) = &q.target {
        conds.push(format!("target = {}", p.add(t.clone())));
    }
    if let Some(from) = q.from {
        conds.push(format!("at >= {}", p.add(to_micros(from))));
    }
    if let Some(to) = q.to {
        conds.push(format!("at < {}", p.add(to_micros(to))));
    }
    if let Some(before) = q.before {
        conds.push(format!("id < {}", p.add(before.to_string())));
    }
    let filter = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
    let sql = format!("SELECT * FROM audit_events {filter} ORDER BY id DESC LIMIT {}", p.add(i64::from(q.limit)));
    let rows = p.query(sql).fetch_all(pool).await.map_err(unavailable)?;
    rows.iter().map(event_from).collect()
}

fn event_from(r: &impl Columns) -> Result<AuditEvent, StoreError> {
    let token_id: Option<String> = get(r, "token_id")?;
    Ok(AuditEvent {
        id: uuid(r, "id")?,
        at: time(r, "at")?,
        token_id: token_id.and_then(|t| Uuid::parse_str(&t).ok()),
        token_name: get(r, "token_name")?,
        action: get(r, "action")?,
        gateway: get(r, "gateway")?,
        target: get(r, "target")?,
        result: get(r, "result")?,
    })
}
