//! Management-token lifecycle on a manual clock (revocation, expiry, idle timeout,
//! bootstrap restore and retirement, throttled guessing) and the audit trail.

mod common;

use chrono::Duration;
use common::*;
use portcullis::cli::BearerAuth;
use portcullis::domain::clock::Clock;
use portcullis::pb;
use portcullis::pb::access_service_client::AccessServiceClient;
use portcullis::pb::audit_service_client::AuditServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Access = AccessServiceClient<InterceptedService<Channel, BearerAuth>>;
type Audit = AuditServiceClient<InterceptedService<Channel, BearerAuth>>;

async fn access(server: &TestServer, token: &str) -> Access {
    AccessServiceClient::with_interceptor(server.channel().await, BearerAuth::new(token).unwrap())
}

async fn audit(server: &TestServer, token: &str) -> Audit {
    AuditServiceClient::with_interceptor(server.channel().await, BearerAuth::new(token).unwrap())
}

/// A channel whose connection comes from `local` (any 127.0.0.0/8 address is loopback).
async fn channel_from(server: &TestServer, local: &str) -> Channel {
    Channel::from_shared(server.admin_url())
        .unwrap()
        .local_address(Some(local.parse().unwrap()))
        .connect()
        .await
        .unwrap()
}

async fn works_from(server: &TestServer, local: &str, secret: &str) -> Result<(), (Code, String)> {
    let auth = BearerAuth::new(secret).unwrap();
    let mut g =
        pb::gateway_service_client::GatewayServiceClient::with_interceptor(channel_from(server, local).await, auth);
    g.list_gateways(pb::ListGatewaysRequest {}).await.map(|_| ()).map_err(|s| (s.code(), s.message().to_string()))
}

async fn token(
    a: &mut Access,
    name: &str,
    role: pb::Role,
    gateways: &[&str],
    expires: Option<prost_types::Timestamp>,
) -> (String, String) {
    let r = a
        .create_access_token(pb::CreateAccessTokenRequest {
            name: name.into(),
            role: role as i32,
            gateways: gateways.iter().map(|g| g.to_string()).collect(),
            expires_at: expires,
        })
        .await
        .unwrap()
        .into_inner();
    (r.token.unwrap().id, r.secret)
}

async fn works(server: &TestServer, secret: &str) -> Result<(), (Code, String)> {
    let (mut g, _) = server.clients_with(secret).await;
    g.list_gateways(pb::ListGatewaysRequest {}).await.map(|_| ()).map_err(|s| (s.code(), s.message().to_string()))
}

fn unauthorized() -> Result<(), (Code, String)> {
    Err((Code::Unauthenticated, "Unauthorized".into()))
}

#[tokio::test]
async fn revocation_and_expiry_take_effect_on_the_next_call() {
    let server = TestServer::start().await;
    let mut owner = access(&server, OWNER_TOKEN).await;
    let (id, secret) = token(&mut owner, "ci", pb::Role::Admin, &[], None).await;
    assert_eq!(works(&server, &secret).await, Ok(()));
    let revoked =
        owner.revoke_access_token(pb::RevokeAccessTokenRequest { id: id.clone() }).await.unwrap().into_inner();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(works(&server, &secret).await, unauthorized());
    let s = owner
        .revoke_access_token(pb::RevokeAccessTokenRequest { id: uuid::Uuid::nil().to_string() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    let at = server.clock.now() + Duration::hours(1);
    let expires = prost_types::Timestamp { seconds: at.timestamp(), nanos: 0 };
    let (_, secret) = token(&mut owner, "short-lived", pb::Role::Developer, &[], Some(expires)).await;
    server.clock.advance(Duration::minutes(59));
    assert_eq!(works(&server, &secret).await, Ok(()));
    server.clock.advance(Duration::minutes(1));
    assert_eq!(works(&server, &secret).await, unauthorized());
}

#[tokio::test]
async fn idle_tokens_expire_and_use_keeps_them_alive() {
    let mut server = TestServer::start_with(&["--session-idle-timeout", "1h"]).await;
    let mut owner = access(&server, OWNER_TOKEN).await;
    let (_, busy) = token(&mut owner, "busy", pb::Role::Developer, &[], None).await;
    let (_, idle) = token(&mut owner, "idle", pb::Role::Developer, &[], None).await;
    for _ in 0..3 {
        server.clock.advance(Duration::minutes(59));
        assert_eq!(works(&server, &busy).await, Ok(()), "used within the hour");
        assert_eq!(works(&server, OWNER_TOKEN).await, Ok(()));
    }
    assert_eq!(works(&server, &idle).await, unauthorized(), "unused for three hours");
    // Last use survives a restart (recorded at most once a minute, without a write per call).
    server.clock.advance(Duration::minutes(30));
    assert_eq!(works(&server, &busy).await, Ok(()));
    server.restart_with(&["--session-idle-timeout", "1h"]).await.unwrap();
    server.clock.advance(Duration::minutes(45));
    assert_eq!(works(&server, &busy).await, Ok(()));
}

#[tokio::test]
async fn the_bootstrap_token_is_restored_at_start() {
    let mut server = TestServer::start().await;
    let mut owner = access(&server, OWNER_TOKEN).await;
    let me = owner.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.name.as_str(), me.role), ("bootstrap", pb::Role::Owner as i32));
    owner.revoke_access_token(pb::RevokeAccessTokenRequest { id: me.id }).await.unwrap();
    assert_eq!(works(&server, OWNER_TOKEN).await, unauthorized());
    drop(owner);
    server.restart_with(&[]).await.unwrap();
    assert_eq!(works(&server, OWNER_TOKEN).await, Ok(()), "PORTCULLIS_BOOTSTRAP_TOKEN makes sure it is an owner");
}

#[tokio::test]
async fn the_audit_trail_answers_who_changed_this_key_and_when() {
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("alpha")).await.unwrap();
    gw.create_gateway(gateway_req("beta")).await.unwrap();
    let mut owner = access(&server, OWNER_TOKEN).await;
    let (dev_id, dev_secret) = token(&mut owner, "token-user01", pb::Role::Developer, &["alpha"], None).await;
    let (key, key_secret) = create_key(&mut keys, "alpha", "app").await;
    let t_disable = server.clock.now() + Duration::minutes(5);
    server.clock.advance(Duration::minutes(5));
    let (mut dev_gw, mut dev_keys) = server.clients_with(&dev_secret).await;
    dev_keys
        .update_key(pb::UpdateKeyRequest { id: key.id.clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    // Refused: a developer deleting a gateway; a call on another gateway; no token at all.
    let s = dev_gw.delete_gateway(pb::DeleteGatewayRequest { name: "alpha".into(), force: true }).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = dev_keys.list_keys(pb::ListKeysRequest { gateway: "beta".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "You don't have access to this gateway"));
    let (mut nobody, _) = server.clients_with("pcm_not-a-token-at-all-0000000000000000").await;
    assert_eq!(nobody.list_gateways(pb::ListGatewaysRequest {}).await.unwrap_err().code(), Code::Unauthenticated);

    let mut audit_owner = audit(&server, OWNER_TOKEN).await;
    let all = audit_owner.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    let text = format!("{all:?}");
    assert!(
        !text.contains(&key_secret[4..]) && !text.contains(&dev_secret[4..]) && !text.contains(OWNER_TOKEN),
        "no secrets in the audit trail"
    );
    // Newest first: the unauthenticated call.
    assert_eq!(
        (all[0].action.as_str(), all[0].result.as_str(), all[0].token_id.as_str()),
        ("GatewayService/ListGateways", "UNAUTHENTICATED: Unauthorized", "")
    );
    assert_eq!(all[1].action, "KeyService/ListKeys");
    assert_eq!(
        (all[1].gateway.as_str(), all[1].result.as_str()),
        ("beta", "PERMISSION_DENIED: You don't have access to this gateway")
    );
    assert_eq!(all[2].result, "PERMISSION_DENIED: You don't have access to this action");
    assert_eq!(all[2].action, "GatewayService/DeleteGateway");
    // Who changed this key, and when.
    let changes: Vec<_> = all.iter().filter(|e| e.target == key.id).collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    let disable = changes[0];
    assert_eq!(
        (disable.action.as_str(), disable.token_name.as_str(), disable.token_id.as_str()),
        ("KeyService/UpdateKey", "token-user01", dev_id.as_str())
    );
    assert_eq!((disable.gateway.as_str(), disable.result.as_str()), ("alpha", "OK"));
    assert_eq!(disable.time.as_ref().unwrap().seconds, t_disable.timestamp());
    assert_eq!((changes[1].action.as_str(), changes[1].token_name.as_str()), ("KeyService/CreateKey", "bootstrap"));
    // Reads that succeed are not recorded; the token creation is.
    assert!(!all.iter().any(|e| e.action == "KeyService/GetKey"));
    assert!(all.iter().any(|e| e.action == "AccessService/CreateAccessToken" && e.target == dev_id));

    // Filtered by gateway and paginated.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = audit_owner
            .list_audit_events(pb::ListAuditEventsRequest {
                gateway: "alpha".into(),
                page_size: 2,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 2);
        seen.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(seen.iter().all(|e| e.gateway == "alpha"));
    let alpha: Vec<_> = all.iter().filter(|e| e.gateway == "alpha").map(|e| e.id.clone()).collect();
    assert_eq!(seen.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), alpha);

    // A scoped admin reads its gateway's trail, not everyone's.
    let (_, admin_alpha) = token(&mut owner, "admin-alpha", pb::Role::Admin, &["alpha"], None).await;
    let mut scoped = audit(&server, &admin_alpha).await;
    let s = scoped.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "You don't have access to this gateway"));
    assert!(
        scoped
            .list_audit_events(pb::ListAuditEventsRequest { gateway: "alpha".into(), ..Default::default() })
            .await
            .is_ok()
    );
    let mut dev_audit = audit(&server, &dev_secret).await;
    let s = dev_audit
        .list_audit_events(pb::ListAuditEventsRequest { gateway: "alpha".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "You don't have access to this action"));
}

#[tokio::test]
async fn an_unauthenticated_flood_is_audited_without_filling_the_trail() {
    let server = TestServer::start().await;
    let (mut nobody, _) = server.clients_with("pcm_flood-0000000000000000000000000000000000").await;
    for _ in 0..75 {
        assert_eq!(nobody.list_gateways(pb::ListGatewaysRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    }
    // The flood's address is throttled by now: the owner reads from another one.
    let auth = BearerAuth::new(OWNER_TOKEN).unwrap();
    let mut owner = AuditServiceClient::with_interceptor(channel_from(&server, "127.0.0.2").await, auth);
    let count = |events: &[pb::AuditEvent]| events.iter().filter(|e| e.result.starts_with("UNAUTHENTICATED")).count();
    let events = owner
        .list_audit_events(pb::ListAuditEventsRequest { page_size: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(count(&events), 60, "one by one up to the per-minute cap");
    server.clock.advance(Duration::minutes(1));
    nobody.list_gateways(pb::ListGatewaysRequest {}).await.unwrap_err();
    let events = owner
        .list_audit_events(pb::ListAuditEventsRequest { page_size: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(count(&events), 61);
    assert_eq!(
        events[0].result,
        "UNAUTHENTICATED: Unauthorized (and 15 more since 2026-11-23T12:00Z, not recorded one by one)"
    );
}

#[tokio::test]
async fn ids_are_never_echoed_into_the_trail() {
    let server = TestServer::start().await;
    let (_, mut keys) = server.clients().await;
    let pasted = "pcs_SomebodyPastedTheirSecretHere0123456789";
    let s = keys.delete_key(pb::DeleteKeyRequest { id: pasted.into() }).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "id: is not a valid id"));
    let mut owner = audit(&server, OWNER_TOKEN).await;
    let events = owner.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    assert_eq!(events[0].action, "KeyService/DeleteKey");
    assert!(!format!("{events:?}").contains("SomebodyPasted"));
}

#[tokio::test]
async fn failed_guesses_lock_out_their_address_alone_until_the_window_passes() {
    let server = TestServer::start().await;
    let guess = |i: usize| format!("pcm_guess{i:033}");
    for i in 0..9 {
        assert_eq!(works_from(&server, "127.0.0.1", &guess(i)).await, unauthorized());
    }
    assert_eq!(works_from(&server, "127.0.0.1", OWNER_TOKEN).await, Ok(()), "nine failures are allowed");
    assert_eq!(works_from(&server, "127.0.0.1", &guess(9)).await, unauthorized());
    // Ten failures: from that address even the owner token is refused, unseen (an answer
    // that depended on the token would let the guessing go on).
    assert_eq!(works_from(&server, "127.0.0.1", OWNER_TOKEN).await, unauthorized());
    server.clock.advance(Duration::seconds(5));
    assert_eq!(works_from(&server, "127.0.0.1", OWNER_TOKEN).await, unauthorized());
    // Another address is unaffected.
    assert_eq!(works_from(&server, "127.0.0.2", OWNER_TOKEN).await, Ok(()));
    // One more try every 6 s; the whole budget after a minute.
    server.clock.advance(Duration::seconds(1));
    assert_eq!(works_from(&server, "127.0.0.1", &guess(10)).await, unauthorized());
    assert_eq!(works_from(&server, "127.0.0.1", OWNER_TOKEN).await, unauthorized());
    server.clock.advance(Duration::seconds(60));
    assert_eq!(works_from(&server, "127.0.0.1", OWNER_TOKEN).await, Ok(()));
}

#[tokio::test]
async fn refused_calls_with_huge_values_leave_the_trail_small() {
    let server = TestServer::start().await;
    let (mut gw, _) = server.clients().await;
    gw.create_gateway(gateway_req("alpha")).await.unwrap();
    let mut owner = access(&server, OWNER_TOKEN).await;
    let (_, dev) = token(&mut owner, "token-user01", pb::Role::Developer, &["alpha"], None).await;
    let (mut dev_gw, mut dev_keys) = server.clients_with(&dev).await;
    // Past the request size limit: refused before any handler runs.
    let huge = "a".repeat(4 * 1024 * 1024);
    let s = dev_gw.create_gateway(gateway_req(&huge)).await.unwrap_err();
    assert!(matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted), "{s:?}");
    // Within it: 100 refused calls with 200 KB values, in one minute.
    let big = "a".repeat(200 * 1024);
    for i in 0..100 {
        let s = if i % 2 == 0 {
            dev_gw.create_gateway(gateway_req(&big)).await.unwrap_err()
        } else {
            let req = pb::CreateKeyRequest { gateway: big.clone(), name: "k".into(), ..Default::default() };
            dev_keys.create_key(req).await.unwrap_err()
        };
        assert_eq!(s.code(), Code::PermissionDenied);
    }
    let rows = server.db_count("SELECT COUNT(*) FROM audit_events WHERE token_name = ?", "token-user01").await;
    assert_eq!(rows, 60, "one by one up to the per-minute cap");
    let bytes = server
        .db_count(
            "SELECT SUM(LENGTH(token_name) + LENGTH(action) + COALESCE(LENGTH(gateway), 0) + LENGTH(target) + LENGTH(result)) \
             FROM audit_events WHERE token_name = ?",
            "token-user01",
        )
        .await;
    assert!(bytes < 60 * 200, "{bytes} bytes for 60 rows");
    let dir = server.dir.path();
    let on_disk: u64 = ["portcullis.db", "portcullis.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(on_disk < 8 * 1024 * 1024, "the database grew to {on_disk} bytes");
    // The next one recorded says how many were only counted.
    server.clock.advance(Duration::minutes(1));
    dev_gw.create_gateway(gateway_req(&big)).await.unwrap_err();
    let events = audit(&server, OWNER_TOKEN)
        .await
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        (events[0].action.as_str(), events[0].result.as_str(), events[0].gateway.as_str()),
        (
            "GatewayService/CreateGateway",
            "PERMISSION_DENIED: You don't have access to this action (and 40 more since 2026-11-23T12:00Z, not recorded one by one)",
            ""
        )
    );
}

/// Starts a server on `db_url` with `bootstrap` as PORTCULLIS_BOOTSTRAP_TOKEN (or none).
async fn start_with_bootstrap(server: &mut TestServer, bootstrap: Option<&str>) -> Result<(), String> {
    use clap::Parser;
    server.stop().await;
    let mut argv = vec!["portcullis", "serve", "--authz-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    let db = server.db_url.clone();
    argv.extend_from_slice(&["--database-url", &db]);
    if let Some(b) = bootstrap {
        argv.extend_from_slice(&["--bootstrap-token", b]);
    }
    let portcullis::config::Command::Serve(args) = portcullis::config::Cli::try_parse_from(argv).unwrap().command
    else {
        unreachable!()
    };
    let clock: std::sync::Arc<dyn Clock> = server.clock.clone();
    server.running = Some(portcullis::app::start(&args, clock).await.map_err(|e| format!("{e:#}"))?);
    Ok(())
}

#[tokio::test]
async fn a_new_bootstrap_value_retires_the_previous_token() {
    let mut server = TestServer::start().await;
    let mut owner = access(&server, OWNER_TOKEN).await;
    let first = owner.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((first.name.as_str(), first.prefix.as_str()), ("bootstrap", ""), "no part of a chosen secret is shown");
    let listed = owner.list_access_tokens(pb::ListAccessTokensRequest {}).await.unwrap().into_inner().tokens;
    assert!(!format!("{listed:?}").contains(&OWNER_TOKEN[..8]));
    drop(owner);

    let second = "a-new-bootstrap-secret-0123456789abcdef";
    start_with_bootstrap(&mut server, Some(second)).await.unwrap();
    assert_eq!(works(&server, OWNER_TOKEN).await, unauthorized(), "the previous value is retired");
    let mut owner = access(&server, second).await;
    let me = owner.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_ne!(me.id, first.id);
    assert_eq!((me.role, me.prefix.as_str()), (pb::Role::Owner as i32, ""));
    let listed = owner.list_access_tokens(pb::ListAccessTokensRequest {}).await.unwrap().into_inner().tokens;
    let old = listed.iter().find(|t| t.id == first.id).unwrap();
    assert_eq!(old.status, pb::TokenStatus::Revoked as i32);
    let retired = |events: &[pb::AuditEvent]| {
        events.iter().filter(|e| e.action == "Bootstrap/RevokeAccessToken").cloned().collect::<Vec<_>>()
    };
    let events = audit(&server, second)
        .await
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    let r = retired(&events);
    assert_eq!(r.len(), 1, "{events:?}");
    assert_eq!(
        (r[0].target.as_str(), r[0].token_name.as_str(), r[0].result.as_str()),
        (first.id.as_str(), "PORTCULLIS_BOOTSTRAP_TOKEN", "OK")
    );
    assert!(!format!("{events:?}").contains(second) && !format!("{events:?}").contains(OWNER_TOKEN));

    // The same value again retires nothing more; no value keeps the current one.
    start_with_bootstrap(&mut server, Some(second)).await.unwrap();
    start_with_bootstrap(&mut server, None).await.unwrap();
    assert_eq!(works(&server, second).await, Ok(()));
    let events = audit(&server, second)
        .await
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(retired(&events).len(), 1);

    // Too short a value is refused at start, naming the variable, not echoing the value.
    let short = "only-thirty-one-characters-long";
    assert_eq!(short.len(), 31);
    let err = start_with_bootstrap(&mut server, Some(short)).await.unwrap_err();
    assert!(err.contains("PORTCULLIS_BOOTSTRAP_TOKEN: must be at least 32"), "{err}");
    assert!(!err.contains(short), "{err}");
}
