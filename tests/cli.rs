//! The `portcullis` admin client as a process against a real server: gateways, keys, prices,
//! usage, rotation, legacy import, management tokens and the audit trail; tables, `--json`,
//! one-line errors, and the address and token from flags or the environment.

mod common;

use common::process::BIN;
use common::*;
use tokio::process::Command;

/// Runs the CLI as the owner; (success, stdout, stderr).
async fn cli(admin_url: &str, args: &[&str]) -> (bool, String, String) {
    cli_as(admin_url, OWNER_TOKEN, args).await
}

/// Runs the CLI with this management token; (success, stdout, stderr).
async fn cli_as(admin_url: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("PORTCULLIS_ADMIN_URL", admin_url)
        .env("PORTCULLIS_TOKEN", token)
        .output()
        .await
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test]
async fn cli_manages_gateways_and_keys() {
    let server = TestServer::start().await;
    let url = server.admin_url();
    let (ok, out, err) = cli(
        &url,
        &["gateways", "create", "demo", "--upstream-header", "authorization", "--upstream-value", "Bearer sk-x"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("demo") && out.contains("authorization (set)") && !out.contains("sk-x"), "{out}");

    let (ok, out, _) = cli(&url, &["keys", "create", "token-user01", "--gateway", "demo", "--json"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(v["secret"].as_str().unwrap().starts_with("pcs_"));
    assert_eq!(v["status"], "ACTIVE");

    let (ok, out, err) = cli(&url, &["keys", "create", "token-user02", "--gateway", "demo", "--rpm", "5"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("shown only this once") && out.contains("5 rpm"), "{out}");

    let (ok, out, _) = cli(&url, &["keys", "disable", &id]).await;
    assert!(ok && out.contains("DISABLED"), "{out}");
    let (ok, out, _) = cli(&url, &["keys", "list", "--gateway", "demo"]).await;
    assert!(ok);
    assert!(out.starts_with("NAME"), "{out}");
    assert!(out.contains("token-user01") && out.contains("token-user02") && out.contains("DISABLED"), "{out}");
    assert!(!out.contains("pcs_") || out.lines().all(|l| !l.contains("pcs_") || l.contains('…')), "{out}");
    let (ok, out, _) = cli(&url, &["keys", "enable", &id, "--json"]).await;
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["status"], "ACTIVE");

    let (ok, _, err) = cli(&url, &["keys", "create", "token-user01", "--gateway", "demo"]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("already exists (ALREADY_EXISTS)"), "{err}");
    let (ok, _, err) = cli(&url, &["gateways", "delete", "demo"]).await;
    assert!(!ok && err.contains("FAILED_PRECONDITION"), "{err}");
    let (ok, out, _) = cli(&url, &["gateways", "delete", "demo", "--force"]).await;
    assert!(ok && out.contains("2 keys"), "{out}");

    let out = Command::new(BIN)
        .args(["gateways", "list"])
        .env("PORTCULLIS_ADMIN_URL", &url)
        .env_remove("PORTCULLIS_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORTCULLIS_TOKEN"));
    let out = Command::new(BIN)
        .args(["gateways", "list"])
        .env("PORTCULLIS_ADMIN_URL", &url)
        .env("PORTCULLIS_TOKEN", "nope-nope-nope-nope")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized (UNAUTHENTICATED)"));
}

#[tokio::test]
async fn cli_prices_usage_rotation_and_legacy_import() {
    let server = TestServer::start().await;
    let url = server.admin_url();
    let (ok, _, err) = cli(&url, &["gateways", "create", "demo"]).await;
    assert!(ok, "{err}");

    let (ok, out, err) = cli(&url, &["prices", "set", "gpt-4o-mini", "--input", "0.15", "--output", "0.6"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("gpt-4o-mini") && out.contains("$0.15") && out.contains("$0.60"), "{out}");
    let (ok, _, err) = cli(&url, &["prices", "set", "gpt-4o", "--input", "2.5.1", "--output", "10"]).await;
    assert!(!ok && err.contains("price.input_usd_per_million") && err.contains("INVALID_ARGUMENT"), "{err}");
    let (ok, out, _) = cli(&url, &["prices", "list", "--json"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["output_usd_per_million"], "0.60");

    let (ok, out, err) = cli(
        &url,
        &[
            "keys",
            "create",
            "budgeted",
            "--gateway",
            "demo",
            "--token-limit",
            "1000",
            "--cost-limit",
            "5",
            "--reset-period",
            "monthly",
            "--json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let (ok, out, _) = cli(&url, &["keys", "usage", &id]).await;
    assert!(ok);
    assert!(out.contains("0 of 1000") && out.contains("$0.00 of $5.00") && out.contains("monthly"), "{out}");
    let (ok, out, _) = cli(&url, &["keys", "usage", &id, "--json"]).await;
    assert!(ok);
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((u["requests"].as_u64(), u["cost_usd"].as_str()), (Some(0), Some("0.00")));

    let (ok, out, err) = cli(&url, &["keys", "rotate", &id, "--grace", "10m"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("shown only this once") && out.contains("pcs_"), "{out}");

    let out = Command::new(BIN)
        .args(["keys", "import-legacy", "old-integration", "--gateway", "demo"])
        .env("PORTCULLIS_ADMIN_URL", &url)
        .env("PORTCULLIS_TOKEN", OWNER_TOKEN)
        .env("PORTCULLIS_LEGACY_SECRET", "sk-legacy-abcdefghijklmnop")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("old-integration") && !stdout.contains("sk-legacy-abcdefghijklmnop"), "{stdout}");
    let (ok, _, _) = cli(&url, &["prices", "delete", "gpt-4o-mini"]).await;
    assert!(ok);
    let (ok, _, err) = cli(&url, &["prices", "delete", "gpt-4o-mini"]).await;
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
}

#[tokio::test]
async fn cli_manages_tokens_and_reads_the_audit_trail() {
    let server = TestServer::start().await;
    let url = server.admin_url();
    for g in ["alpha", "beta"] {
        assert!(cli(&url, &["gateways", "create", g]).await.0);
    }
    let (ok, out, err) =
        cli(&url, &["tokens", "create", "token-user01", "--role", "developer", "--gateway", "alpha"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("token-user01") && out.contains("developer") && out.contains("shown only this once"), "{out}");
    let secret = out.lines().find(|l| l.starts_with("pcm_")).expect("secret printed").trim().to_string();

    let (ok, out, _) = cli_as(&url, &secret, &["tokens", "whoami"]).await;
    assert!(ok && out.contains("token-user01") && out.contains("alpha"), "{out}");
    let (ok, _, err) = cli_as(&url, &secret, &["keys", "create", "app", "--gateway", "alpha"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli_as(&url, &secret, &["keys", "list", "--gateway", "beta"]).await;
    assert!(!ok);
    assert_eq!(err.trim(), "error: You don't have access to this gateway (PERMISSION_DENIED)");
    let (ok, _, err) = cli_as(&url, &secret, &["gateways", "delete", "alpha"]).await;
    assert_eq!((ok, err.trim()), (false, "error: You don't have access to this action (PERMISSION_DENIED)"));

    let (ok, out, _) = cli(&url, &["tokens", "list", "--json"]).await;
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dev = list.as_array().unwrap().iter().find(|t| t["name"] == "token-user01").unwrap().clone();
    assert!(!out.contains(&secret[12..]), "secrets are never listed");
    let (ok, out, _) = cli(&url, &["audit", "--gateway", "alpha", "--json"]).await;
    assert!(ok);
    let events: serde_json::Value = serde_json::from_str(&out).unwrap();
    let actions: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions[..2], ["GatewayService/DeleteGateway", "KeyService/CreateKey"], "{actions:?}");
    assert_eq!(events[0]["token_name"], "token-user01");
    let (ok, out, _) = cli(&url, &["audit", "--limit", "3"]).await;
    assert!(ok && out.starts_with("TIME") && out.lines().count() == 4, "{out}");

    // By actor, named or by id: the developer's calls (its key, its refused delete), none of the
    // owner's; and the owner's, none of the developer's.
    let actions_of = |out: &str| -> Vec<(String, String)> {
        let events: serde_json::Value = serde_json::from_str(out).unwrap();
        events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["token_name"].as_str().unwrap().to_string(), e["action"].as_str().unwrap().to_string()))
            .collect()
    };
    let (ok, out, err) = cli(&url, &["audit", "--actor", "token-user01", "--json"]).await;
    assert!(ok, "{err}");
    let by_name = actions_of(&out);
    assert!(by_name.iter().all(|(who, _)| who == "token-user01"), "{by_name:?}");
    for action in ["GatewayService/DeleteGateway", "KeyService/CreateKey"] {
        assert!(by_name.iter().any(|(_, a)| a == action), "{action} missing: {by_name:?}");
    }
    let (ok, out, _) = cli(&url, &["audit", "--actor", dev["id"].as_str().unwrap(), "--json"]).await;
    assert!(ok);
    assert_eq!(actions_of(&out), by_name, "the same events by the token's id");
    let (ok, out, _) = cli(&url, &["tokens", "whoami", "--json"]).await;
    assert!(ok, "{out}");
    let owner = serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["name"].as_str().unwrap().to_string();
    let (ok, out, _) = cli(&url, &["audit", "--actor", &owner, "--json"]).await;
    assert!(ok);
    let by_owner = actions_of(&out);
    assert!(by_owner.iter().all(|(who, _)| *who == owner), "{by_owner:?}");
    assert!(by_owner.iter().any(|(_, a)| a == "AccessService/CreateAccessToken"), "{by_owner:?}");
    let (ok, out, _) = cli(&url, &["audit", "--actor", "nobody-such"]).await;
    assert!(ok && out.lines().count() == 1, "only the header: {out}");

    // Address and token from flags, with no environment.
    let out = Command::new(BIN)
        .args(["--admin-url", &url, "--token", OWNER_TOKEN, "tokens", "list"])
        .env_remove("PORTCULLIS_ADMIN_URL")
        .env_remove("PORTCULLIS_TOKEN")
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listed.contains("token-user01") && listed.contains("ACTIVE"), "{listed}");
    let (ok, out, _) = cli(&url, &["tokens", "revoke", dev["id"].as_str().unwrap()]).await;
    assert!(ok && out.contains("REVOKED"), "{out}");
    let (ok, out, _) = cli(&url, &["tokens", "list", "--json"]).await;
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dev = list.as_array().unwrap().iter().find(|t| t["name"] == "token-user01").unwrap().clone();
    assert!(ok && dev["status"] == "TOKEN_STATUS_REVOKED", "{dev}");
    let (ok, _, err) = cli_as(&url, &secret, &["tokens", "whoami"]).await;
    assert_eq!((ok, err.trim()), (false, "error: Unauthorized (UNAUTHENTICATED)"));
}

#[tokio::test]
async fn cli_filters_and_orders_keys_reads_key_and_gateway_usage_history_and_filters_the_audit_trail() {
    use chrono::{DurationRound, Utc};
    let server = TestServer::start().await;
    let url = server.admin_url();
    assert!(cli(&url, &["gateways", "create", "demo"]).await.0);
    for name in ["alpha", "beta", "alphabet"] {
        assert!(cli(&url, &["keys", "create", name, "--gateway", "demo"]).await.0);
    }
    let (ok, out, _) = cli(&url, &["keys", "list", "--gateway", "demo", "--json"]).await;
    assert!(ok);
    let keys: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id_of = |name: &str| keys.as_array().unwrap().iter().find(|k| k["name"] == name).unwrap()["id"].clone();
    let beta = id_of("beta").as_str().unwrap().to_string();
    assert_eq!(keys[0]["usage"]["cost_usd"], "0.00", "{out}");
    assert!(cli(&url, &["keys", "disable", &beta]).await.0);

    let (ok, out, err) =
        cli(&url, &["keys", "list", "--gateway", "demo", "--name", "ALPHA", "--order-by", "name", "--desc"]).await;
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    assert!(header.starts_with("NAME") && header.contains("SPENT"), "{out}");
    let names: Vec<&str> = out.lines().skip(1).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(names, ["alphabet", "alpha"], "{out}");
    let (ok, out, _) = cli(&url, &["keys", "list", "--gateway", "demo", "--status", "disabled", "--json"]).await;
    assert!(ok);
    let disabled: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(disabled.as_array().unwrap().len(), 1);
    assert_eq!(disabled[0]["name"], "beta");
    let (ok, _, err) = cli(&url, &["keys", "list", "--gateway", "demo", "--order-by", "colour"]).await;
    assert!(!ok && err.contains("--order-by"), "{err}");

    // History: written to the ledger beside the server, an hour ago by the real clock (the
    // CLI asks for the last N days from now).
    let store = portcullis::store::open(&server.db_url, portcullis::store::sealing::Sealer::default()).await.unwrap();
    let hour = Utc::now().duration_trunc(chrono::Duration::hours(1)).unwrap() - chrono::Duration::hours(1);
    let row = |model: &str, n: u64| portcullis::domain::budget::UsageBucket {
        key_id: uuid::Uuid::parse_str(&beta).unwrap(),
        hour,
        model: model.into(),
        requests: n,
        prompt_tokens: 100 * n,
        completion_tokens: 10 * n,
        cost_micros: 1_500_000 * n as i64,
    };
    store.save_usage_history(&[row("gpt-4.1", 2), row("claude", 1)]).await.unwrap();
    let (ok, out, err) = cli(&url, &["keys", "history", &beta, "--by", "hour", "--days", "2", "--by-model"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("START") && out.contains("MODEL"), "{out}");
    assert!(
        out.contains("gpt-4.1") && out.contains("$3.00") && out.contains("claude") && out.contains("$1.50"),
        "{out}"
    );
    let (ok, out, _) = cli(&url, &["keys", "history", &beta, "--json"]).await;
    assert!(ok);
    let h: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(h["granularity"], "day");
    assert_eq!(h["buckets"][0]["requests"], 3);
    assert_eq!(h["buckets"][0]["cost_usd"], "4.50");
    let (ok, _, err) = cli(&url, &["keys", "history", &beta, "--by", "hour", "--days", "40"]).await;
    assert!(!ok && err.contains("from"), "{err}");

    // The audit trail filtered: the server's clock is 2026-11-23 12:00.
    let (ok, out, err) = cli(&url, &["audit", "--action", "KeyService/UpdateKey", "--target", &beta, "--json"]).await;
    assert!(ok, "{err}");
    let events: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "{out}");
    let (ok, out, _) = cli(&url, &["audit", "--action", "KeyService", "--until", "2026-11-23T11:00:00Z"]).await;
    assert!(ok && out.lines().count() == 1, "only the header: {out}");
    let (ok, out, _) = cli(&url, &["audit", "--action", "KeyService", "--since", "2026-11-23T11:00:00Z"]).await;
    assert!(ok && out.lines().count() == 5, "three creations and a disable: {out}");
    let (ok, _, err) = cli(&url, &["audit", "--since", "yesterday"]).await;
    assert!(!ok && err.contains("--since"), "{err}");

    // A gateway's history adds up its keys' and no other gateway's.
    assert!(cli(&url, &["gateways", "create", "other"]).await.0);
    let (ok, out, _) = cli(&url, &["keys", "create", "elsewhere", "--gateway", "other", "--json"]).await;
    assert!(ok);
    let elsewhere = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let alpha = id_of("alpha").as_str().unwrap().to_string();
    let in_key = |id: &str, model: &str, n: u64| portcullis::domain::budget::UsageBucket {
        key_id: uuid::Uuid::parse_str(id).unwrap(),
        ..row(model, n)
    };
    store.save_usage_history(&[in_key(&alpha, "gpt-4.1", 4), in_key(&elsewhere, "gpt-4.1", 7)]).await.unwrap();
    let (ok, out, err) = cli(&url, &["gateways", "history", "demo", "--json"]).await;
    assert!(ok, "{err}");
    let h: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(h["granularity"], "day");
    assert_eq!(h["buckets"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!((h["buckets"][0]["requests"].as_u64(), h["buckets"][0]["cost_usd"].as_str()), (Some(7), Some("10.50")));
    let (ok, out, err) = cli(&url, &["gateways", "history", "demo", "--by", "hour", "--days", "2", "--by-model"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("START") && out.contains("MODEL"), "{out}");
    let rows: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "one hour, two models: {out}");
    assert!(rows.iter().any(|r| r[1..] == ["gpt-4.1", "6", "600", "60", "$9.00"]), "{out}");
    assert!(rows.iter().any(|r| r[1..] == ["claude", "1", "100", "10", "$1.50"]), "{out}");
    let (ok, out, _) = cli(&url, &["gateways", "history", "other", "--json"]).await;
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["buckets"][0]["requests"], 7, "{out}");
    let (ok, _, err) = cli(&url, &["gateways", "history", "nosuch"]).await;
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
}
