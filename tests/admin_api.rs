//! The admin API over real gRPC on loopback: validation, errors (never echoing what was
//! refused), timestamp ranges, auth, secrets, pagination, reflection and health.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use chrono::Duration;
use common::*;
use portcullis::domain::clock::Clock;
use portcullis::pb;
use tonic::Code;

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 }
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, contains: &str) {
    let s = r.expect_err("expected an error");
    assert_eq!(s.code(), code, "message: {}", s.message());
    assert!(s.message().contains(contains), "'{}' does not mention '{contains}'", s.message());
}

#[tokio::test]
async fn every_admin_rpc_requires_a_valid_management_token() {
    let server = TestServer::start().await;
    for token in ["", "wrong-token-0123456789", "test-token", "Basic abc"] {
        let (mut gw, mut keys) = server.clients_with(token).await;
        let r = gw.list_gateways(pb::ListGatewaysRequest {}).await;
        let s = r.expect_err("refused");
        assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "Unauthorized"), "token {token:?}");
        let s = keys.get_key(pb::GetKeyRequest { id: "x".into() }).await.expect_err("refused");
        assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "Unauthorized"));
    }
    // No authorization header at all.
    let mut raw = pb::gateway_service_client::GatewayServiceClient::new(server.channel().await);
    let s = raw.create_gateway(gateway_req("demo")).await.expect_err("refused");
    assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "Unauthorized"));
    // The right token without the Bearer scheme, or under another scheme, is refused too.
    for value in [OWNER_TOKEN.to_string(), format!("Basic {OWNER_TOKEN}"), format!("Bearer{OWNER_TOKEN}")] {
        let mut req = tonic::Request::new(pb::ListGatewaysRequest {});
        req.metadata_mut().insert("authorization", value.parse().unwrap());
        let s = raw.list_gateways(req).await.expect_err("refused");
        assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "Unauthorized"), "{value}");
    }
    let (mut gw, _) = server.clients().await;
    assert!(gw.list_gateways(pb::ListGatewaysRequest {}).await.unwrap().into_inner().gateways.is_empty());
}

#[tokio::test]
async fn dev_mode_accepts_test_token() {
    let server = TestServer::start_with(&["--dev"]).await;
    let (mut gw, _) = server.clients_with("test-token").await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (mut gw, _) = server.clients_with("test-token-but-longer").await;
    assert_status(gw.list_gateways(pb::ListGatewaysRequest {}).await, Code::Unauthenticated, "Unauthorized");
}

#[tokio::test]
async fn gateway_crud_and_validation() {
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;

    for bad in ["", "Demo", "-x", "a_b", &"a".repeat(64)] {
        assert_status(gw.create_gateway(gateway_req(bad)).await, Code::InvalidArgument, "name");
    }
    let bad_inbound = pb::CreateGatewayRequest {
        name: "demo".into(),
        inbound_auth: Some(pb::InboundAuth { key_name: "bad header".into(), location: 1 }),
        ..Default::default()
    };
    assert_status(gw.create_gateway(bad_inbound).await, Code::InvalidArgument, "inbound_auth.key_name");
    let bad_location = pb::CreateGatewayRequest {
        name: "demo".into(),
        inbound_auth: Some(pb::InboundAuth { key_name: "k".into(), location: 9 }),
        ..Default::default()
    };
    assert_status(gw.create_gateway(bad_location).await, Code::InvalidArgument, "inbound_auth.location");
    let no_value = pb::CreateGatewayRequest {
        name: "demo".into(),
        upstream_auth: Some(pb::UpstreamAuth { header_name: "authorization".into(), ..Default::default() }),
        ..Default::default()
    };
    assert_status(gw.create_gateway(no_value).await, Code::InvalidArgument, "upstream_auth.value");
    assert!(
        gw.list_gateways(pb::ListGatewaysRequest {}).await.unwrap().into_inner().gateways.is_empty(),
        "no half-written rows"
    );

    let created = gw
        .create_gateway(pb::CreateGatewayRequest {
            name: "demo".into(),
            inbound_auth: None,
            upstream_auth: Some(pb::UpstreamAuth {
                header_name: "Authorization".into(),
                value: "Bearer sk-provider-secret".into(),
                value_set: false,
            }),
            default_reservation_tokens: 256,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "demo");
    assert_eq!(created.inbound_auth.as_ref().unwrap().key_name, "x-api-key");
    assert_eq!(created.inbound_auth.as_ref().unwrap().location, pb::KeyLocation::Header as i32);
    let up = created.upstream_auth.clone().unwrap();
    assert_eq!((up.header_name.as_str(), up.value.as_str(), up.value_set), ("authorization", "", true));
    assert_eq!(created.default_reservation_tokens, 256);
    assert_status(gw.create_gateway(gateway_req("demo")).await, Code::AlreadyExists, "gateway");

    let got = gw.get_gateway(pb::GetGatewayRequest { name: "demo".into() }).await.unwrap().into_inner();
    assert_eq!(got, created);
    assert!(!format!("{got:?}").contains("sk-provider-secret"), "provider key returned");
    let listed = gw.list_gateways(pb::ListGatewaysRequest {}).await.unwrap().into_inner();
    assert!(!format!("{listed:?}").contains("sk-provider-secret"), "provider key listed");
    // The value is write-only: renaming the header without resending it keeps it.
    let renamed = gw
        .update_gateway(pb::UpdateGatewayRequest {
            name: "demo".into(),
            upstream_auth: Some(pb::UpstreamAuth { header_name: "x-provider-key".into(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let up = renamed.upstream_auth.clone().unwrap();
    assert_eq!((up.header_name.as_str(), up.value.as_str(), up.value_set), ("x-provider-key", "", true));
    assert!(!format!("{renamed:?}").contains("sk-provider-secret"));
    assert_status(gw.get_gateway(pb::GetGatewayRequest { name: "nope".into() }).await, Code::NotFound, "gateway");

    let updated = gw
        .update_gateway(pb::UpdateGatewayRequest {
            name: "demo".into(),
            inbound_auth: Some(pb::InboundAuth { key_name: "api_key".into(), location: pb::KeyLocation::Query as i32 }),
            upstream_auth: None,
            default_reservation_tokens: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.inbound_auth.unwrap().key_name, "api_key");
    assert!(updated.upstream_auth.unwrap().value_set, "an update that leaves upstream_auth alone keeps it");
    let cleared = gw
        .update_gateway(pb::UpdateGatewayRequest {
            name: "demo".into(),
            upstream_auth: Some(pb::UpstreamAuth::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.upstream_auth.is_none());
    assert_status(
        gw.update_gateway(pb::UpdateGatewayRequest { name: "nope".into(), ..Default::default() }).await,
        Code::NotFound,
        "gateway",
    );

    // A gateway with keys is only deleted with force, and takes its keys with it.
    let (key, _) = create_key(&mut keys, "demo", "k1").await;
    assert_status(
        gw.delete_gateway(pb::DeleteGatewayRequest { name: "demo".into(), force: false }).await,
        Code::FailedPrecondition,
        "force",
    );
    let r =
        gw.delete_gateway(pb::DeleteGatewayRequest { name: "demo".into(), force: true }).await.unwrap().into_inner();
    assert_eq!(r.deleted_keys, 1);
    assert_status(keys.get_key(pb::GetKeyRequest { id: key.id }).await, Code::NotFound, "key");
    assert_status(gw.get_gateway(pb::GetGatewayRequest { name: "demo".into() }).await, Code::NotFound, "gateway");
    // The name can be used again.
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    gw.delete_gateway(pb::DeleteGatewayRequest { name: "demo".into(), force: false }).await.unwrap();
}

#[tokio::test]
async fn key_crud_validation_and_secrets() {
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    gw.create_gateway(gateway_req("other")).await.unwrap();
    let now = server.clock.now();

    let req = |name: &str| pb::CreateKeyRequest { gateway: "demo".into(), name: name.into(), ..Default::default() };
    assert_status(keys.create_key(req("")).await, Code::InvalidArgument, "name");
    assert_status(
        keys.create_key(pb::CreateKeyRequest { gateway: "nope".into(), ..req("k") }).await,
        Code::NotFound,
        "gateway",
    );
    assert_status(
        keys.create_key(pb::CreateKeyRequest { gateway: "".into(), ..req("k") }).await,
        Code::InvalidArgument,
        "gateway",
    );
    assert_status(
        keys.create_key(pb::CreateKeyRequest { expires_at: Some(ts(now - Duration::seconds(1))), ..req("k") }).await,
        Code::InvalidArgument,
        "expires_at",
    );
    let bad_limits = pb::Limits { cost_limit_usd: Some("12.3.4".into()), ..Default::default() };
    assert_status(
        keys.create_key(pb::CreateKeyRequest { limits: Some(bad_limits), ..req("k") }).await,
        Code::InvalidArgument,
        "limits.cost_limit_usd",
    );

    let created = keys
        .create_key(pb::CreateKeyRequest {
            limits: Some(pb::Limits {
                cost_limit_usd: Some("12.5".into()),
                token_limit: Some(100_000),
                requests_per_minute: Some(60),
                reset_period: pb::ResetPeriod::Monthly as i32,
            }),
            expires_at: Some(ts(now + Duration::days(30))),
            ..req("token-user01")
        })
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret.clone();
    let key = created.key.unwrap();
    assert!(secret.starts_with("pcs_") && secret.len() == 42, "{secret}");
    assert_eq!(key.prefix, &secret[..12]);
    assert_eq!(key.gateway, "demo");
    assert_eq!(key.status, pb::KeyStatus::Active as i32);
    assert!(key.enabled && !key.legacy);
    let limits = key.limits.clone().unwrap();
    assert_eq!(limits.requests_per_minute, Some(60));
    assert_eq!(limits.cost_limit_usd.as_deref(), Some("12.50"));
    assert_eq!((limits.token_limit, limits.reset_period), (Some(100_000), pb::ResetPeriod::Monthly as i32));
    assert_eq!(key.expires_at.as_ref().unwrap().seconds, (now + Duration::days(30)).timestamp());
    assert_status(keys.create_key(req("token-user01")).await, Code::AlreadyExists, "name");
    // The same name in another gateway is fine.
    keys.create_key(pb::CreateKeyRequest { gateway: "other".into(), ..req("token-user01") }).await.unwrap();

    let got = keys.get_key(pb::GetKeyRequest { id: key.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got, key);
    assert!(!format!("{got:?}").contains(&secret[12..]), "secret returned after creation");
    let listed = keys.list_keys(pb::ListKeysRequest { gateway: "demo".into(), ..Default::default() }).await.unwrap();
    assert!(!format!("{listed:?}").contains(&secret[12..]), "secret listed");
    // Renaming onto another live key's name is refused.
    create_key(&mut keys, "demo", "taken").await;
    assert_status(
        keys.update_key(pb::UpdateKeyRequest { id: key.id.clone(), name: Some("taken".into()), ..Default::default() })
            .await,
        Code::AlreadyExists,
        "name",
    );
    assert_status(keys.get_key(pb::GetKeyRequest { id: "not-a-uuid".into() }).await, Code::InvalidArgument, "id");
    assert_status(keys.get_key(pb::GetKeyRequest { id: uuid::Uuid::nil().to_string() }).await, Code::NotFound, "key");

    // Updates: rename, disable, limits, expiry.
    let u = keys
        .update_key(pb::UpdateKeyRequest {
            id: key.id.clone(),
            name: Some("token-user02".into()),
            enabled: Some(false),
            limits: Some(pb::Limits { requests_per_minute: Some(10), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.name, "token-user02");
    assert_eq!(u.status, pb::KeyStatus::Disabled as i32);
    assert_eq!(u.limits.as_ref().unwrap().requests_per_minute, Some(10));
    assert_status(
        keys.update_key(pb::UpdateKeyRequest {
            id: key.id.clone(),
            expires_at: Some(ts(now - Duration::hours(1))),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "expires_at",
    );
    assert_status(
        keys.update_key(pb::UpdateKeyRequest {
            id: key.id.clone(),
            expires_at: Some(ts(now + Duration::hours(1))),
            clear_expires_at: true,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "clear_expires_at",
    );
    assert_status(
        keys.update_key(pb::UpdateKeyRequest {
            id: key.id.clone(),
            limits: Some(pb::Limits { requests_per_minute: Some(0), ..Default::default() }),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "limits.requests_per_minute",
    );
    let unchanged = keys.get_key(pb::GetKeyRequest { id: key.id.clone() }).await.unwrap().into_inner();
    assert_eq!(unchanged, u, "a refused update changes nothing");

    keys.delete_key(pb::DeleteKeyRequest { id: key.id.clone() }).await.unwrap();
    assert_status(keys.get_key(pb::GetKeyRequest { id: key.id.clone() }).await, Code::NotFound, "key");
    assert_status(keys.delete_key(pb::DeleteKeyRequest { id: key.id.clone() }).await, Code::NotFound, "key");
    // A deleted key's name can be reused.
    keys.create_key(req("token-user02")).await.unwrap();
}

#[tokio::test]
async fn list_keys_pages_in_creation_order() {
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    gw.create_gateway(gateway_req("other")).await.unwrap();
    let mut names = Vec::new();
    for i in 0..5 {
        names.push(create_key(&mut keys, "demo", &format!("token-user{i:02}")).await.0.name);
    }
    create_key(&mut keys, "other", "elsewhere").await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = keys
            .list_keys(pb::ListKeysRequest {
                gateway: "demo".into(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, names);
    assert_eq!(pages, 3);
    let all = keys.list_keys(pb::ListKeysRequest { gateway: "demo".into(), ..Default::default() }).await.unwrap();
    assert_eq!(all.get_ref().keys.len(), 5);
    assert!(all.get_ref().next_page_token.is_empty());
    assert_status(
        keys.list_keys(pb::ListKeysRequest { gateway: "demo".into(), page_size: 1001, ..Default::default() }).await,
        Code::InvalidArgument,
        "page_size",
    );
    assert_status(
        keys.list_keys(pb::ListKeysRequest {
            gateway: "demo".into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_status(
        keys.list_keys(pb::ListKeysRequest { gateway: "nope".into(), ..Default::default() }).await,
        Code::NotFound,
        "gateway",
    );
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_admin_services() {
    use tokio_stream::StreamExt;
    let server = TestServer::start().await;

    let mut v1 =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["portcullis.admin.v1.GatewayService", "portcullis.admin.v1.KeyService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }

    use tonic_reflection::pb::v1alpha as a;
    let mut alpha = a::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let req = a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(a::server_reflection_request::MessageRequest::FileContainingSymbol(
            "portcullis.admin.v1.KeyService".into(),
        )),
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    match resp.message_response {
        Some(a::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) => {
            assert!(!fd.file_descriptor_proto.is_empty());
        }
        other => panic!("unexpected v1alpha response: {other:?}"),
    }
}

#[tokio::test]
async fn health_serves_on_both_listeners_and_flips_on_shutdown() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut server = TestServer::start().await;
    let authz = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", server.authz_port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (ch, service) in [
        (authz.clone(), "envoy.service.auth.v3.Authorization"),
        (authz.clone(), ""),
        (server.channel().await, "portcullis.admin.v1.KeyService"),
        (server.channel().await, ""),
    ] {
        let r = HealthClient::new(ch).check(HealthCheckRequest { service: service.into() }).await.unwrap();
        assert_eq!(r.into_inner().status, ServingStatus::Serving as i32, "{service}");
    }
    let mut watch =
        HealthClient::new(authz).watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let stop = tokio::spawn(async move { server.stop().await });
    assert_eq!(watch.next().await.unwrap().unwrap().status, ServingStatus::NotServing as i32);
    drop(watch);
    stop.await.unwrap();
}

#[tokio::test]
async fn role_authz_runs_only_the_envoy_facing_listener() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = TestServer::start_with(&["--role", "authz"]).await;
    assert!(server.running().admin_addr.is_none());
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", server.authz_port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    let r = health.check(HealthCheckRequest { service: "envoy.service.auth.v3.Authorization".into() }).await.unwrap();
    assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);
    let s = health.check(HealthCheckRequest { service: "portcullis.admin.v1.KeyService".into() }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "an authz-only process does not claim the admin services");
}

#[tokio::test]
async fn provider_key_is_encrypted_at_rest_when_a_key_is_set() {
    const KEY: &str = "8f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";
    let mut server = TestServer::start_with(&["--encryption-key", KEY]).await;
    let (mut gw, _) = server.clients().await;
    gw.create_gateway(pb::CreateGatewayRequest {
        name: "demo".into(),
        upstream_auth: Some(pb::UpstreamAuth {
            header_name: "authorization".into(),
            value: "Bearer sk-at-rest-secret".into(),
            value_set: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(gw);
    server.stop().await;
    for entry in std::fs::read_dir(server.dir.path()).unwrap() {
        // The WAL may be checkpointed away while we look.
        let Ok(bytes) = std::fs::read(entry.unwrap().path()) else { continue };
        assert!(!bytes.windows(13).any(|w| w == b"sk-at-rest-se"), "the provider key is stored in plain text");
    }
    let err = server.restart_with(&[]).await.unwrap_err();
    assert!(err.contains("PORTCULLIS_ENCRYPTION_KEY is not set"), "{err}");
    assert!(!err.contains("sk-at-rest"), "{err}");
    let wrong = KEY.replace('8', "9");
    let err = server.restart_with(&["--encryption-key", &wrong]).await.unwrap_err();
    assert!(err.contains("wrong key"), "{err}");
    server.restart_with(&["--encryption-key", KEY]).await.unwrap();
    let gateway = server.running().shared.view().unwrap().gateway("demo").cloned().unwrap();
    assert_eq!(gateway.upstream.as_ref().unwrap().value, "Bearer sk-at-rest-secret");
    let err = server.restart_with(&["--encryption-key", "not-hex"]).await.unwrap_err();
    assert!(err.contains("64 hex characters"), "{err}");
}

/// Everything this test binary logs, at debug level and up.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    Arc::clone(LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this binary");
        buf
    }))
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn rejected_values_are_never_echoed_into_errors_the_trail_or_the_log() {
    let log = captured_log();
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    const PASTED: &str = "sk-proj-PastedProviderKey0123456789";
    let upstream =
        |header_name: String| Some(pb::UpstreamAuth { header_name, value: "Bearer x".into(), value_set: false });
    let mut refused = Vec::new();
    // A provider key pasted into header_name, on create and on update.
    refused.push((
        gw.create_gateway(pb::CreateGatewayRequest {
            name: "other".into(),
            upstream_auth: upstream(format!("Authorization: Bearer {PASTED}")),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "upstream_auth.header_name",
    ));
    refused.push((
        gw.update_gateway(pb::UpdateGatewayRequest {
            name: "demo".into(),
            upstream_auth: upstream(format!("Bearer {PASTED}")),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "upstream_auth.header_name",
    ));
    let inbound = Some(pb::InboundAuth { key_name: format!("{PASTED}&x"), location: pb::KeyLocation::Query as i32 });
    refused.push((
        gw.update_gateway(pb::UpdateGatewayRequest {
            name: "demo".into(),
            inbound_auth: inbound,
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "inbound_auth.key_name",
    ));
    refused.push((gw.create_gateway(gateway_req(PASTED)).await.map(|_| ()), "name"));
    refused.push((
        gw.delete_gateway(pb::DeleteGatewayRequest { name: PASTED.into(), force: true }).await.map(|_| ()),
        "name",
    ));
    let limits = Some(pb::Limits { cost_limit_usd: Some(PASTED.into()), ..Default::default() });
    let req = pb::CreateKeyRequest { gateway: "demo".into(), name: "k".into(), limits, ..Default::default() };
    refused.push((keys.create_key(req).await.map(|_| ()), "limits.cost_limit_usd"));
    let mut prices = pb::pricing_service_client::PricingServiceClient::with_interceptor(
        server.channel().await,
        portcullis::cli::BearerAuth::new(OWNER_TOKEN).unwrap(),
    );
    let price = |model: &str, input: &str| pb::SetModelPriceRequest {
        price: Some(pb::ModelPrice {
            model: model.into(),
            input_usd_per_million: input.into(),
            output_usd_per_million: "1".into(),
        }),
    };
    refused.push((prices.set_model_price(price(&format!("gpt {PASTED}"), "1")).await.map(|_| ()), "price.model"));
    refused.push((prices.set_model_price(price("gpt-4o", PASTED)).await.map(|_| ()), "price.input_usd_per_million"));
    for (i, (r, field)) in refused.into_iter().enumerate() {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), Code::InvalidArgument, "call {i}: {}", s.message());
        assert!(s.message().starts_with(&format!("{field}: ")), "call {i}: '{}' names {field}", s.message());
        assert!(!s.message().contains("PastedProviderKey"), "call {i}: {}", s.message());
    }
    let mut audit = pb::audit_service_client::AuditServiceClient::with_interceptor(
        server.channel().await,
        portcullis::cli::BearerAuth::new(OWNER_TOKEN).unwrap(),
    );
    let events = audit.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    assert!(events.iter().any(|e| e.result.starts_with("INVALID_ARGUMENT: upstream_auth.header_name")), "{events:?}");
    assert!(!format!("{events:?}").contains("PastedProviderKey"), "{events:?}");
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert!(log.contains("upstream_auth.header_name"), "the log is captured");
    assert!(!log.contains("PastedProviderKey"), "{log}");
}

#[tokio::test]
async fn timestamps_and_durations_outside_the_protobuf_ranges_are_refused() {
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    // 10000-01-01T00:00:00Z, and the last second of 9999.
    let year_10000 = prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 };
    let last = prost_types::Timestamp { seconds: 253_402_300_799, nanos: 999_999_999 };
    let bad_nanos = prost_types::Timestamp { seconds: ts(server.clock.now()).seconds + 3600, nanos: -1 };
    let req = |expires_at| pb::CreateKeyRequest {
        gateway: "demo".into(),
        name: "k".into(),
        expires_at: Some(expires_at),
        ..Default::default()
    };
    assert_status(keys.create_key(req(year_10000)).await, Code::InvalidArgument, "expires_at");
    assert_status(keys.create_key(req(bad_nanos)).await, Code::InvalidArgument, "expires_at");
    let created = keys.create_key(req(last)).await.unwrap().into_inner();
    let key = created.key.unwrap();
    for t in [year_10000, bad_nanos] {
        let update = pb::UpdateKeyRequest { id: key.id.clone(), expires_at: Some(t), ..Default::default() };
        assert_status(keys.update_key(update).await, Code::InvalidArgument, "expires_at");
    }
    let mut access = pb::access_service_client::AccessServiceClient::with_interceptor(
        server.channel().await,
        portcullis::cli::BearerAuth::new(OWNER_TOKEN).unwrap(),
    );
    let token = pb::CreateAccessTokenRequest {
        name: "ci".into(),
        role: pb::Role::Developer as i32,
        gateways: vec![],
        expires_at: Some(year_10000),
    };
    assert_status(access.create_access_token(token).await, Code::InvalidArgument, "expires_at");
    for (seconds, nanos) in [(0, 1_000_000_000), (5, -1), (-5, 1), (0, -999_999_999), (-1, 0)] {
        let rotate =
            pb::RotateKeyRequest { id: key.id.clone(), grace_period: Some(prost_types::Duration { seconds, nanos }) };
        assert_status(keys.rotate_key(rotate).await, Code::InvalidArgument, "grace_period");
    }
    // Nothing changed, and every listed time is one protobuf-JSON clients can print.
    let listed = keys.list_keys(pb::ListKeysRequest { gateway: "demo".into(), ..Default::default() }).await.unwrap();
    // Listed keys also carry their usage, which the created key does not.
    let listed: Vec<_> = listed.into_inner().keys.into_iter().map(|k| pb::ApiKey { usage: None, ..k }).collect();
    assert_eq!(listed, vec![key.clone()]);
    let tokens = access.list_access_tokens(pb::ListAccessTokensRequest {}).await.unwrap().into_inner().tokens;
    assert!(!tokens.iter().any(|t| t.name == "ci"));
    let rotated = keys
        .rotate_key(pb::RotateKeyRequest {
            id: key.id.clone(),
            grace_period: Some(prost_types::Duration { seconds: 60, nanos: 500_000_000 }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.secret, created.secret);
}

#[tokio::test]
async fn writes_are_limited_per_token_and_keys_per_gateway() {
    let flags = ["--admin-write-burst", "3", "--admin-writes-per-second", "1", "--max-keys-per-gateway", "2"];
    let server = TestServer::start_with(&flags).await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (first, _) = create_key(&mut keys, "demo", "one").await;
    create_key(&mut keys, "demo", "two").await;
    // Three writes at once, then one a second.
    let req = || pb::CreateKeyRequest { gateway: "demo".into(), name: "three".into(), ..Default::default() };
    assert_status(keys.create_key(req()).await, Code::ResourceExhausted, "retry in 1 s");
    // Reads are not limited.
    keys.get_key(pb::GetKeyRequest { id: first.id.clone() }).await.unwrap();
    server.clock.advance(Duration::seconds(1));
    assert_status(keys.create_key(req()).await, Code::ResourceExhausted, "--max-keys-per-gateway");
    server.clock.advance(Duration::seconds(1));
    keys.delete_key(pb::DeleteKeyRequest { id: first.id }).await.unwrap();
    server.clock.advance(Duration::seconds(1));
    keys.create_key(req()).await.expect("a deleted key frees its place");

    // The refused writes are in the audit trail, as refusals.
    let mut audit = pb::audit_service_client::AuditServiceClient::with_interceptor(
        server.channel().await,
        portcullis::cli::BearerAuth::new(OWNER_TOKEN).unwrap(),
    );
    let events = audit.list_audit_events(pb::ListAuditEventsRequest::default()).await.unwrap().into_inner().events;
    let refused: Vec<&str> =
        events.iter().filter(|e| e.result.starts_with("RESOURCE_EXHAUSTED")).map(|e| e.action.as_str()).collect();
    assert_eq!(refused, ["KeyService/CreateKey", "KeyService/CreateKey"]);
}

#[tokio::test]
async fn damaged_stored_data_is_an_internal_error_not_a_retry() {
    let server = TestServer::start().await;
    let (mut gw, _) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    gw.list_gateways(pb::ListGatewaysRequest::default()).await.unwrap();
    // A row no release writes: a gateway id that is no UUID.
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(&server.db_url).await.unwrap();
    sqlx::query("UPDATE gateways SET id = 'not-a-uuid' WHERE name = 'demo'").execute(&pool).await.unwrap();
    pool.close().await;
    // Retrying cannot help: INTERNAL, not UNAVAILABLE, and nothing of the row in the message.
    let s = gw.list_gateways(pb::ListGatewaysRequest::default()).await.expect_err("damaged");
    assert_eq!((s.code(), s.message()), (Code::Internal, "internal error"));
}

#[tokio::test]
async fn a_forced_gateway_delete_forgets_its_keys_and_their_counters() {
    let server = TestServer::start().await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, _) = create_key(&mut keys, "demo", "one").await;
    let id: uuid::Uuid = key.id.parse().unwrap();
    let meters = &server.running().shared.limiters.meters;
    // The key has been used: its counters are in memory.
    keys.get_key_usage(pb::GetKeyUsageRequest { id: key.id.clone() }).await.unwrap();
    assert!(meters.holds(id));
    let r = gw.delete_gateway(pb::DeleteGatewayRequest { name: "demo".into(), force: true }).await.unwrap();
    assert_eq!(r.into_inner().deleted_keys, 1);
    assert!(!meters.holds(id), "a deleted key's counters are not kept (nor flushed) any more");
    let s = keys.get_key(pb::GetKeyRequest { id: key.id }).await.expect_err("deleted");
    assert_eq!(s.code(), Code::NotFound);
}
