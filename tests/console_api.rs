//! What the console asks of the admin API: keys listed with filters, orders and their usage
//! in one call; the audit trail filtered; usage history per hour or day. Real gRPC over
//! loopback, a real SQLite file (the storage suite runs the same queries on PostgreSQL).

mod common;

use chrono::{Duration, TimeZone, Utc};
use common::*;
use portcullis::cli::BearerAuth;
use portcullis::domain::budget::{Metered, UsageBucket};
use portcullis::domain::clock::Clock;
use portcullis::domain::money;
use portcullis::pb;
use portcullis::pb::access_service_client::AccessServiceClient;
use portcullis::pb::audit_service_client::AuditServiceClient;
use portcullis::pb::usage_service_client::UsageServiceClient;
use portcullis::store::{DynStore, sealing::Sealer};
use tonic::Code;
use uuid::Uuid;

/// The server's database, opened beside it (as a second replica's process would).
async fn store_of(server: &TestServer) -> DynStore {
    portcullis::store::open(&server.db_url, Sealer::default()).await.unwrap()
}

/// Charges `micros` USD and `tokens` tokens to key `id` as metering would, and writes it to
/// the ledger.
async fn spend(server: &TestServer, store: &DynStore, id: &str, micros: i64, tokens: u64) {
    let shared = &server.running().shared;
    let key = store.get_key(Uuid::parse_str(id).unwrap()).await.unwrap().unwrap();
    let m = Metered { prompt_tokens: tokens, completion_tokens: 0, cost_micros: micros };
    let charge = move |_| m;
    shared.limiters.counters.settle(key.id, Some(key.limits.reset_period), None, &charge, shared.clock.read()).await;
    assert!(portcullis::upkeep::flush_usage(&**store, shared, false).await);
}

fn names(r: &pb::ListKeysResponse) -> Vec<&str> {
    r.keys.iter().map(|k| k.name.as_str()).collect()
}

fn list(gateway: &str) -> pb::ListKeysRequest {
    pb::ListKeysRequest { gateway: gateway.into(), ..Default::default() }
}

#[tokio::test]
async fn list_keys_filters_orders_pages_and_carries_each_keys_usage() {
    let server = TestServer::start().await;
    let store = store_of(&server).await;
    let (mut gateways, mut keys) = server.clients().await;
    gateways.create_gateway(gateway_req("demo")).await.unwrap();
    let monthly = pb::Limits {
        cost_limit_usd: Some("10".into()),
        reset_period: pb::ResetPeriod::Monthly as i32,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for (name, expires_in) in [("alpha", None), ("Beta", None), ("gamma", None), ("alphabet", Some(1))] {
        let expires_at = expires_in.map(|h| prost_types::Timestamp {
            seconds: (server.clock.now() + Duration::hours(h)).timestamp(),
            nanos: 0,
        });
        let req = pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: name.into(),
            limits: Some(monthly.clone()),
            expires_at,
        };
        ids.push(keys.create_key(req).await.unwrap().into_inner().key.unwrap().id);
    }
    keys.update_key(pb::UpdateKeyRequest { id: ids[2].clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    server.clock.advance(Duration::hours(2)); // alphabet has expired
    spend(&server, &store, &ids[0], 500_000, 40).await;
    spend(&server, &store, &ids[1], 250_000, 10).await;

    let all = keys.list_keys(list("demo")).await.unwrap().into_inner();
    assert_eq!(names(&all), ["alpha", "Beta", "gamma", "alphabet"], "creation order by default");
    let usage = all.keys[0].usage.clone().expect("each listed key carries its usage");
    assert_eq!((usage.cost_usd.as_str(), usage.total_tokens, usage.requests), ("0.50", 40, 1));
    assert_eq!(usage.key_id, ids[0]);
    assert_eq!(all.keys[2].usage.as_ref().unwrap().cost_usd, money::format_usd(0));
    let single = keys.get_key(pb::GetKeyRequest { id: ids[0].clone() }).await.unwrap().into_inner();
    assert!(single.usage.is_none(), "only ListKeys fills usage in");

    let find = |req: pb::ListKeysRequest| {
        let mut keys = keys.clone();
        async move { keys.list_keys(req).await.unwrap().into_inner() }
    };
    let by_name = find(pb::ListKeysRequest { name_contains: "ALPHA".into(), ..list("demo") }).await;
    assert_eq!(names(&by_name), ["alpha", "alphabet"]);
    for (status, want) in [
        (pb::KeyStatus::Active, vec!["alpha", "Beta"]),
        (pb::KeyStatus::Disabled, vec!["gamma"]),
        (pb::KeyStatus::Expired, vec!["alphabet"]),
    ] {
        let r = find(pb::ListKeysRequest { status: status as i32, ..list("demo") }).await;
        assert_eq!(names(&r), want, "{status:?}");
    }
    let by_spend =
        find(pb::ListKeysRequest { order_by: pb::KeyOrder::Spend as i32, descending: true, ..list("demo") }).await;
    assert_eq!(names(&by_spend), ["alpha", "Beta", "alphabet", "gamma"], "ties newest first when descending");

    // Pages of one, by name: every key once, in order; the token belongs to that order.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListKeysRequest {
            order_by: pb::KeyOrder::Name as i32,
            page_size: 1,
            page_token: token,
            ..list("demo")
        };
        let page = find(req).await;
        paged.extend(page.keys.into_iter().map(|k| k.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, ["alpha", "alphabet", "Beta", "gamma"]);
    let first = find(pb::ListKeysRequest { order_by: pb::KeyOrder::Name as i32, page_size: 1, ..list("demo") }).await;
    let wrong = pb::ListKeysRequest {
        order_by: pb::KeyOrder::Spend as i32,
        page_token: first.next_page_token.clone(),
        ..list("demo")
    };
    let e = keys.list_keys(wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("page_token:"), "{}", e.message());

    for (req, field) in [
        (pb::ListKeysRequest { status: 9, ..list("demo") }, "status"),
        (pb::ListKeysRequest { order_by: 9, ..list("demo") }, "order_by"),
        (pb::ListKeysRequest { name_contains: "x".repeat(129), ..list("demo") }, "name_contains"),
        (pb::ListKeysRequest { page_token: "pcs_not-a-token".into(), ..list("demo") }, "page_token"),
    ] {
        let e = keys.list_keys(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(&format!("{field}:")), "{}", e.message());
        assert!(!e.message().contains("pcs_"), "values are not echoed");
    }
}

#[tokio::test]
async fn audit_events_are_filtered_by_actor_action_target_and_time() {
    let server = TestServer::start().await;
    let ch = server.channel().await;
    let owner = BearerAuth::new(OWNER_TOKEN).unwrap();
    let mut access = AccessServiceClient::with_interceptor(ch.clone(), owner.clone());
    let ops = access
        .create_access_token(pb::CreateAccessTokenRequest {
            name: "ops".into(),
            role: pb::Role::Admin as i32,
            gateways: vec![],
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let started = server.clock.now();
    server.clock.advance(Duration::minutes(1));
    let (mut gateways, mut keys) = server.clients_with(&ops.secret).await;
    gateways.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, _) = create_key(&mut keys, "demo", "k1").await;
    server.clock.advance(Duration::minutes(1));
    let later = server.clock.now();
    keys.update_key(pb::UpdateKeyRequest { id: key.id.clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();

    let mut audit = AuditServiceClient::with_interceptor(ch, owner);
    let find = |req: pb::ListAuditEventsRequest| {
        let mut audit = audit.clone();
        async move {
            let events = audit.list_audit_events(req).await.unwrap().into_inner().events;
            events.into_iter().map(|e| e.action).collect::<Vec<_>>()
        }
    };
    let by_ops = find(pb::ListAuditEventsRequest { actor: "ops".into(), ..Default::default() }).await;
    assert_eq!(by_ops, ["KeyService/UpdateKey", "KeyService/CreateKey", "GatewayService/CreateGateway"]);
    let by_id = find(pb::ListAuditEventsRequest { actor: ops.token.unwrap().id, ..Default::default() }).await;
    assert_eq!(by_id, by_ops, "the actor by token id");
    let me = access.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    let by_owner = find(pb::ListAuditEventsRequest { actor: me.name, ..Default::default() }).await;
    assert_eq!(by_owner, ["AccessService/CreateAccessToken"]);
    let key_calls = find(pb::ListAuditEventsRequest { action: "KeyService".into(), ..Default::default() }).await;
    assert_eq!(key_calls, ["KeyService/UpdateKey", "KeyService/CreateKey"]);
    let on_key = find(pb::ListAuditEventsRequest {
        target: key.id.clone(),
        action: "KeyService/UpdateKey".into(),
        gateway: "demo".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(on_key, ["KeyService/UpdateKey"]);
    let ts = |t: chrono::DateTime<Utc>| Some(prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 });
    let first_minute = find(pb::ListAuditEventsRequest {
        from: ts(started + Duration::seconds(30)),
        to: ts(later),
        ..Default::default()
    })
    .await;
    assert_eq!(first_minute, ["KeyService/CreateKey", "GatewayService/CreateGateway"]);

    for (req, field) in [
        (pb::ListAuditEventsRequest { action: "Key Service".into(), ..Default::default() }, "action"),
        (pb::ListAuditEventsRequest { target: "x".repeat(300), ..Default::default() }, "target"),
        (pb::ListAuditEventsRequest { from: ts(later), to: ts(started), ..Default::default() }, "to"),
    ] {
        let e = audit.list_audit_events(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(&format!("{field}:")), "{}", e.message());
    }
}

#[tokio::test]
async fn usage_history_per_key_or_gateway_per_hour_or_day_by_model() {
    let server = TestServer::start().await;
    let store = store_of(&server).await;
    let (mut gateways, mut keys) = server.clients().await;
    gateways.create_gateway(gateway_req("demo")).await.unwrap();
    let (a, _) = create_key(&mut keys, "demo", "a").await;
    let (b, _) = create_key(&mut keys, "demo", "b").await;
    let day = Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap();
    let bucket = |id: &str, hours: i64, model: &str, n: u64| UsageBucket {
        key_id: Uuid::parse_str(id).unwrap(),
        hour: day + Duration::hours(hours),
        model: model.into(),
        requests: n,
        prompt_tokens: 10 * n,
        completion_tokens: 20 * n,
        cost_micros: 250_000 * n as i64,
    };
    let rows = [bucket(&a.id, 1, "gpt-4.1", 1), bucket(&a.id, 1, "claude", 2), bucket(&a.id, 30, "gpt-4.1", 4)];
    store.save_usage_history(&rows).await.unwrap();
    store.save_usage_history(&[bucket(&b.id, 2, "gpt-4.1", 8)]).await.unwrap();

    let mut usage = UsageServiceClient::with_interceptor(server.channel().await, BearerAuth::new(OWNER_TOKEN).unwrap());
    // The default: the last 7 days by day, up to now (2026-11-23 12:00) rounded up.
    let week = usage
        .get_usage_history(pb::GetUsageHistoryRequest { key_id: a.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(week.granularity, pb::Granularity::Day as i32);
    assert_eq!(week.from.unwrap().seconds, Utc.with_ymd_and_hms(2026, 11, 16, 0, 0, 0).unwrap().timestamp());
    assert_eq!(week.to.unwrap().seconds, Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap().timestamp());
    let got: Vec<_> =
        week.buckets.iter().map(|b| (b.start.unwrap().seconds, b.requests, b.cost_usd.as_str())).collect();
    assert_eq!(got, [(day.timestamp(), 3, "0.75"), ((day + Duration::days(1)).timestamp(), 4, "1.00")]);
    assert_eq!(
        (week.buckets[0].prompt_tokens, week.buckets[0].completion_tokens, week.buckets[0].total_tokens),
        (30, 60, 90)
    );

    let ts = |t: chrono::DateTime<Utc>| Some(prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 });
    let hourly = usage
        .get_usage_history(pb::GetUsageHistoryRequest {
            key_id: a.id.clone(),
            granularity: pb::Granularity::Hour as i32,
            from: ts(day),
            to: ts(day + Duration::days(1)),
            by_model: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = hourly.buckets.iter().map(|b| (b.model.as_str(), b.requests)).collect();
    assert_eq!(got, [("claude", 2), ("gpt-4.1", 1)], "hour 1 by model; hour 30 is outside");

    let gateway = usage
        .get_usage_history(pb::GetUsageHistoryRequest {
            gateway: "demo".into(),
            from: ts(day),
            to: ts(day + Duration::days(2)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gateway.buckets.iter().map(|b| b.requests).collect::<Vec<_>>(), [11, 4], "both keys");

    for (req, field) in [
        (pb::GetUsageHistoryRequest::default(), "key_id"),
        (pb::GetUsageHistoryRequest { key_id: a.id.clone(), gateway: "demo".into(), ..Default::default() }, "gateway"),
        (
            pb::GetUsageHistoryRequest {
                key_id: a.id.clone(),
                granularity: pb::Granularity::Hour as i32,
                from: ts(day - Duration::days(40)),
                ..Default::default()
            },
            "from",
        ),
    ] {
        let e = usage.get_usage_history(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(&format!("{field}:")), "{}", e.message());
    }
    let e = usage
        .get_usage_history(pb::GetUsageHistoryRequest { gateway: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
