//! Management-token lifecycle on a manual clock (revocation, expiry, idle timeout,
//! bootstrap restore) and the audit trail.

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
            .list_audit_events(pb::ListAuditEventsRequest { gateway: "alpha".into(), page_size: 2, page_token })
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
    let mut owner = audit(&server, OWNER_TOKEN).await;
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
    assert!(events[0].result.contains("and 15 more the minute before"), "{}", events[0].result);
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
