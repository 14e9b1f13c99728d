//! CLI output: aligned tables for people, JSON for scripts.

use serde_json::{Value, json};

use crate::pb;

pub struct Out {
    pub json: bool,
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn status_name(s: i32) -> &'static str {
    match pb::KeyStatus::try_from(s) {
        Ok(pb::KeyStatus::Active) => "ACTIVE",
        Ok(pb::KeyStatus::Disabled) => "DISABLED",
        Ok(pb::KeyStatus::Expired) => "EXPIRED",
        _ => "UNKNOWN",
    }
}

fn period_name(p: i32) -> &'static str {
    match pb::ResetPeriod::try_from(p) {
        Ok(pb::ResetPeriod::Daily) => "daily",
        Ok(pb::ResetPeriod::Weekly) => "weekly",
        Ok(pb::ResetPeriod::Monthly) => "monthly",
        _ => "never",
    }
}

fn gateway_json(g: &pb::Gateway) -> Value {
    let inbound = g.inbound_auth.clone().unwrap_or_default();
    json!({
        "id": g.id,
        "name": g.name,
        "inbound_auth": {
            "key_name": inbound.key_name,
            "location": if inbound.location == pb::KeyLocation::Query as i32 { "query" } else { "header" },
        },
        "upstream_auth": g.upstream_auth.as_ref().map(|u| json!({"header_name": u.header_name, "value_set": u.value_set})),
        "default_reservation_tokens": g.default_reservation_tokens,
        "created_at": ts(&g.created_at),
    })
}

fn limits_json(l: &Option<pb::Limits>) -> Value {
    let l = l.clone().unwrap_or_default();
    json!({
        "cost_limit_usd": l.cost_limit_usd,
        "token_limit": l.token_limit,
        "requests_per_minute": l.requests_per_minute,
        "reset_period": period_name(l.reset_period),
    })
}

fn key_json(k: &pb::ApiKey) -> Value {
    let mut v = json!({
        "id": k.id,
        "gateway": k.gateway,
        "name": k.name,
        "prefix": k.prefix,
        "status": status_name(k.status),
        "enabled": k.enabled,
        "legacy": k.legacy,
        "limits": limits_json(&k.limits),
        "created_at": ts(&k.created_at),
        "expires_at": k.expires_at.as_ref().map(|_| ts(&k.expires_at)),
        "last_used_at": k.last_used_at.as_ref().map(|_| ts(&k.last_used_at)),
    });
    if let Some(u) = &k.usage {
        v["usage"] = usage_json(u);
    }
    v
}

fn usage_json(u: &pb::KeyUsage) -> Value {
    json!({
        "key_id": u.key_id,
        "period_start": ts(&u.period_start),
        "period_end": u.period_end.as_ref().map(|_| ts(&u.period_end)),
        "requests": u.requests,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "cost_usd": u.cost_usd,
        "reserved_tokens": u.reserved_tokens,
        "reserved_usd": u.reserved_usd,
        "requests_last_minute": u.requests_last_minute,
        "last_denied_at": u.last_denied_at.as_ref().map(|_| ts(&u.last_denied_at)),
        "last_deny_reason": (!u.last_deny_reason.is_empty()).then_some(&u.last_deny_reason),
    })
}

fn limits_text(l: &Option<pb::Limits>) -> String {
    let Some(l) = l else { return "-".into() };
    let mut parts = Vec::new();
    if let Some(c) = &l.cost_limit_usd {
        parts.push(format!("${c}"));
    }
    if let Some(t) = l.token_limit {
        parts.push(format!("{t} tokens"));
    }
    if let Some(r) = l.requests_per_minute {
        parts.push(format!("{r} rpm"));
    }
    if parts.is_empty() {
        return "-".into();
    }
    if l.reset_period != pb::ResetPeriod::Never as i32 {
        parts.push(period_name(l.reset_period).to_string());
    }
    parts.join(", ")
}

/// Prints rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

impl Out {
    fn print_json(&self, v: Value) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }

    pub fn gateways(&self, gs: &[pb::Gateway]) {
        if self.json {
            return self.print_json(Value::Array(gs.iter().map(gateway_json).collect()));
        }
        let rows = gs
            .iter()
            .map(|g| {
                let inbound = g.inbound_auth.clone().unwrap_or_default();
                let location = if inbound.location == pb::KeyLocation::Query as i32 { "query" } else { "header" };
                vec![
                    g.name.clone(),
                    format!("{location}:{}", inbound.key_name),
                    g.upstream_auth.as_ref().map(|u| format!("{} (set)", u.header_name)).unwrap_or_else(|| "-".into()),
                    ts(&g.created_at),
                    g.id.clone(),
                ]
            })
            .collect();
        table(&["NAME", "CLIENT KEY IN", "PROVIDER KEY", "CREATED AT", "ID"], rows);
    }

    pub fn keys(&self, ks: &[pb::ApiKey]) {
        if self.json {
            return self.print_json(Value::Array(ks.iter().map(key_json).collect()));
        }
        // Listed keys carry this period's usage; a single key (get, update) does not.
        let with_usage = ks.iter().any(|k| k.usage.is_some());
        let rows = ks
            .iter()
            .map(|k| {
                let mut row = vec![
                    k.name.clone(),
                    format!("{}…", k.prefix),
                    status_name(k.status).to_string(),
                    limits_text(&k.limits),
                ];
                if with_usage {
                    let u = k.usage.clone().unwrap_or_default();
                    row.extend([u.requests.to_string(), u.total_tokens.to_string(), format!("${}", u.cost_usd)]);
                }
                row.extend([
                    ts(&k.created_at),
                    if k.expires_at.is_some() { ts(&k.expires_at) } else { "never".into() },
                    k.id.clone(),
                ]);
                row
            })
            .collect();
        let mut header = vec!["NAME", "PREFIX", "STATUS", "LIMITS"];
        if with_usage {
            header.extend(["REQUESTS", "TOKENS", "SPENT"]);
        }
        header.extend(["CREATED AT", "EXPIRES", "ID"]);
        table(&header, rows);
    }

    pub fn created_key(&self, r: &pb::CreateKeyResponse) {
        let key = r.key.clone().unwrap_or_default();
        if self.json {
            let mut v = key_json(&key);
            v["secret"] = Value::String(r.secret.clone());
            return self.print_json(v);
        }
        self.keys(&[key]);
        println!("\nSecret (shown only this once; store it now):\n{}", r.secret);
    }

    pub fn prices(&self, ps: &[pb::ModelPrice]) {
        if self.json {
            let v = ps
                .iter()
                .map(|p| json!({"model": p.model, "input_usd_per_million": p.input_usd_per_million, "output_usd_per_million": p.output_usd_per_million}))
                .collect();
            return self.print_json(Value::Array(v));
        }
        let rows = ps
            .iter()
            .map(|p| {
                vec![p.model.clone(), format!("${}", p.input_usd_per_million), format!("${}", p.output_usd_per_million)]
            })
            .collect();
        table(&["MODEL", "INPUT / 1M", "OUTPUT / 1M"], rows);
    }

    pub fn usage(&self, u: &pb::KeyUsage) {
        let limits = u.limits.clone().unwrap_or_default();
        if self.json {
            let mut v = usage_json(u);
            v["limits"] = limits_json(&u.limits);
            return self.print_json(v);
        }
        let of = |limit: Option<String>| limit.map(|l| format!(" of {l}")).unwrap_or_default();
        let period_end = if u.period_end.is_some() { ts(&u.period_end) } else { "never resets".into() };
        let rows = vec![
            vec![
                "period".into(),
                format!("{} .. {period_end} ({})", ts(&u.period_start), period_name(limits.reset_period)),
            ],
            vec!["requests".into(), u.requests.to_string()],
            vec![
                "tokens".into(),
                format!(
                    "{}{} (prompt {}, completion {})",
                    u.total_tokens,
                    of(limits.token_limit.map(|t| t.to_string())),
                    u.prompt_tokens,
                    u.completion_tokens
                ),
            ],
            vec!["cost".into(), format!("${}{}", u.cost_usd, of(limits.cost_limit_usd.map(|c| format!("${c}"))))],
            vec![
                "last minute".into(),
                format!("{} requests{}", u.requests_last_minute, of(limits.requests_per_minute.map(|r| r.to_string()))),
            ],
            vec!["in flight".into(), format!("{} tokens, ${} reserved", u.reserved_tokens, u.reserved_usd)],
            vec![
                "last denied".into(),
                if u.last_deny_reason.is_empty() {
                    "never".into()
                } else {
                    format!("{} ({})", ts(&u.last_denied_at), u.last_deny_reason)
                },
            ],
        ];
        table(&["KEY", &u.key_id], rows);
    }

    pub fn tokens(&self, tokens: &[pb::AccessToken]) {
        let role = |r: i32| match pb::Role::try_from(r) {
            Ok(pb::Role::Owner) => "owner",
            Ok(pb::Role::Admin) => "admin",
            Ok(pb::Role::Developer) => "developer",
            _ => "-",
        };
        let opt = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|_| ts(t));
        if self.json {
            let v = tokens
                .iter()
                .map(|t| {
                    json!({
                        "id": t.id, "name": t.name, "role": role(t.role), "status": pb::TokenStatus::try_from(t.status).map(|s| s.as_str_name()).unwrap_or("-"), "gateways": t.gateways, "prefix": t.prefix,
                        "created_at": ts(&t.created_at), "expires_at": opt(&t.expires_at),
                        "last_used_at": opt(&t.last_used_at), "revoked_at": opt(&t.revoked_at),
                    })
                })
                .collect();
            return self.print_json(Value::Array(v));
        }
        let rows = tokens
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    role(t.role).to_string(),
                    if t.gateways.is_empty() { "all".into() } else { t.gateways.join(",") },
                    match pb::TokenStatus::try_from(t.status) {
                        Ok(pb::TokenStatus::Active) => "ACTIVE",
                        Ok(pb::TokenStatus::Revoked) => "REVOKED",
                        Ok(pb::TokenStatus::Expired) => "EXPIRED",
                        _ => "-",
                    }
                    .to_string(),
                    opt(&t.last_used_at).unwrap_or_else(|| "never".into()),
                    if t.prefix.is_empty() { "-".into() } else { format!("{}…", t.prefix) },
                    t.id.clone(),
                ]
            })
            .collect();
        table(&["NAME", "ROLE", "GATEWAYS", "STATUS", "LAST USED", "PREFIX", "ID"], rows);
    }

    pub fn created_token(&self, r: &pb::CreateAccessTokenResponse) {
        let token = r.token.clone().unwrap_or_default();
        if self.json {
            return self.print_json(json!({"id": token.id, "name": token.name, "secret": r.secret}));
        }
        self.tokens(&[token]);
        println!("\nSecret (shown only this once; store it now):\n{}", r.secret);
    }

    pub fn audit(&self, events: &[pb::AuditEvent]) {
        if self.json {
            let v = events
                .iter()
                .map(|e| {
                    json!({
                        "id": e.id, "time": ts(&e.time), "token_id": e.token_id, "token_name": e.token_name,
                        "action": e.action, "gateway": e.gateway, "target": e.target, "result": e.result,
                    })
                })
                .collect();
            return self.print_json(Value::Array(v));
        }
        let rows = events
            .iter()
            .map(|e| {
                vec![
                    ts(&e.time),
                    if e.token_name.is_empty() { "-".into() } else { e.token_name.clone() },
                    if e.token_id.is_empty() { "-".into() } else { e.token_id.clone() },
                    e.action.clone(),
                    if e.gateway.is_empty() { "-".into() } else { e.gateway.clone() },
                    if e.target.is_empty() { "-".into() } else { e.target.clone() },
                    e.result.clone(),
                ]
            })
            .collect();
        table(&["TIME", "TOKEN", "TOKEN ID", "ACTION", "GATEWAY", "TARGET", "RESULT"], rows);
    }

    pub fn history(&self, h: &pb::UsageHistory, by_model: bool) {
        if self.json {
            let buckets: Vec<Value> = h
                .buckets
                .iter()
                .map(|b| {
                    json!({
                        "start": ts(&b.start), "model": b.model, "requests": b.requests,
                        "prompt_tokens": b.prompt_tokens, "completion_tokens": b.completion_tokens,
                        "total_tokens": b.total_tokens, "cost_usd": b.cost_usd,
                    })
                })
                .collect();
            let granularity = if h.granularity == pb::Granularity::Hour as i32 { "hour" } else { "day" };
            return self.print_json(json!({
                "from": ts(&h.from), "to": ts(&h.to), "granularity": granularity, "buckets": buckets,
            }));
        }
        let rows = h
            .buckets
            .iter()
            .map(|b| {
                let mut row = vec![ts(&b.start)];
                if by_model {
                    row.push(if b.model.is_empty() { "-".into() } else { b.model.clone() });
                }
                row.extend([
                    b.requests.to_string(),
                    b.prompt_tokens.to_string(),
                    b.completion_tokens.to_string(),
                    format!("${}", b.cost_usd),
                ]);
                row
            })
            .collect();
        let mut header = vec!["START"];
        if by_model {
            header.push("MODEL");
        }
        header.extend(["REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "COST"]);
        table(&header, rows);
    }

    pub fn message(&self, json: Value, text: &str) {
        if self.json { self.print_json(json) } else { println!("{text}") }
    }
}
