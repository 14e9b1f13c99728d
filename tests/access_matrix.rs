//! Every admin RPC with every role, in and out of gateway scope: the exact code.

mod common;

use common::*;
use portcullis::cli::BearerAuth;
use portcullis::pb;
use portcullis::pb::access_service_client::AccessServiceClient;
use portcullis::pb::audit_service_client::AuditServiceClient;
use portcullis::pb::pricing_service_client::PricingServiceClient;
use portcullis::pb::usage_service_client::UsageServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Svc = InterceptedService<Channel, BearerAuth>;

#[derive(Clone)]
struct Clients {
    gateways: Gateways,
    keys: Keys,
    prices: PricingServiceClient<Svc>,
    access: AccessServiceClient<Svc>,
    audit: AuditServiceClient<Svc>,
    usage: UsageServiceClient<Svc>,
}

async fn clients(server: &TestServer, token: &str) -> Clients {
    let ch = server.channel().await;
    let auth = BearerAuth::new(token).unwrap();
    let (gateways, keys) = server.clients_with(token).await;
    Clients {
        gateways,
        keys,
        prices: PricingServiceClient::with_interceptor(ch.clone(), auth.clone()),
        access: AccessServiceClient::with_interceptor(ch.clone(), auth.clone()),
        audit: AuditServiceClient::with_interceptor(ch.clone(), auth.clone()),
        usage: UsageServiceClient::with_interceptor(ch, auth),
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scope {
    /// The call names a gateway (directly or through a key).
    Gateway,
    /// The call spans every gateway: scoped tokens are refused.
    Global,
    /// The call names no gateway.
    Free,
}

use Scope::*;

/// (RPC, owner may, admin may, developer may, scope) — SPEC §4.
const RPCS: &[(&str, bool, bool, bool, Scope)] = &[
    ("CreateGateway", true, true, false, Gateway),
    ("GetGateway", true, true, true, Gateway),
    ("ListGateways", true, true, true, Free),
    ("UpdateGateway", true, true, false, Gateway),
    ("DeleteGateway", true, true, false, Gateway),
    ("CreateKey", true, true, true, Gateway),
    ("GetKey", true, true, true, Gateway),
    ("ListKeys", true, true, true, Gateway),
    ("UpdateKey", true, true, true, Gateway),
    ("DeleteKey", true, true, true, Gateway),
    ("ImportLegacyKey", true, true, true, Gateway),
    ("GetKeyUsage", true, true, true, Gateway),
    ("RotateKey", true, true, true, Gateway),
    ("SetModelPrice", true, true, false, Global),
    ("ListModelPrices", true, true, true, Free),
    ("DeleteModelPrice", true, true, false, Global),
    ("CreateAccessToken", true, false, false, Gateway),
    ("ListAccessTokens", true, false, false, Free),
    ("RevokeAccessToken", true, false, false, Gateway),
    ("WhoAmI", true, true, true, Free),
    ("ListAuditEvents", true, true, false, Gateway),
    ("GetUsageHistory", true, true, true, Gateway),
    ("GetUsageHistory/key", true, true, true, Gateway),
];

struct Fixture {
    owner: Clients,
    seq: std::sync::atomic::AtomicUsize,
}

impl Fixture {
    fn next(&self) -> usize {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    async fn gateway(&self, name: &str) {
        let mut g = self.owner.gateways.clone();
        let _ = g.create_gateway(gateway_req(name)).await;
    }

    async fn key(&self, gateway: &str) -> String {
        let mut k = self.owner.keys.clone();
        create_key(&mut k, gateway, &format!("k{}", self.next())).await.0.id
    }

    async fn dev_token(&self, gateway: &str) -> String {
        let mut a = self.owner.access.clone();
        let r = a
            .create_access_token(pb::CreateAccessTokenRequest {
                name: format!("t{}", self.next()),
                role: pb::Role::Developer as i32,
                gateways: vec![gateway.into()],
                expires_at: None,
            })
            .await
            .unwrap();
        r.into_inner().token.unwrap().id
    }
}

/// Calls `rpc` as `c`, on gateway `gw` (a fresh one for creations/deletions: `gw` + "-new").
async fn call(f: &Fixture, c: &Clients, rpc: &str, gw: &str) -> (Code, String) {
    let mut c = c.clone();
    match rpc {
        "CreateGateway" => code(c.gateways.create_gateway(gateway_req(&format!("{gw}-new{}", f.next()))).await),
        "GetGateway" => code(c.gateways.get_gateway(pb::GetGatewayRequest { name: gw.into() }).await),
        "ListGateways" => code(c.gateways.list_gateways(pb::ListGatewaysRequest {}).await),
        "UpdateGateway" => code(
            c.gateways
                .update_gateway(pb::UpdateGatewayRequest {
                    name: gw.into(),
                    default_reservation_tokens: Some(7),
                    ..Default::default()
                })
                .await,
        ),
        "DeleteGateway" => {
            let name = format!("{gw}-doomed");
            f.gateway(&name).await;
            code(c.gateways.delete_gateway(pb::DeleteGatewayRequest { name, force: true }).await)
        }
        "CreateKey" => code(
            c.keys
                .create_key(pb::CreateKeyRequest {
                    gateway: gw.into(),
                    name: format!("new{}", f.next()),
                    ..Default::default()
                })
                .await,
        ),
        "GetKey" => code(c.keys.get_key(pb::GetKeyRequest { id: f.key(gw).await }).await),
        "ListKeys" => code(c.keys.list_keys(pb::ListKeysRequest { gateway: gw.into(), ..Default::default() }).await),
        "UpdateKey" => {
            let id = f.key(gw).await;
            code(c.keys.update_key(pb::UpdateKeyRequest { id, enabled: Some(false), ..Default::default() }).await)
        }
        "DeleteKey" => code(c.keys.delete_key(pb::DeleteKeyRequest { id: f.key(gw).await }).await),
        "ImportLegacyKey" => code(
            c.keys
                .import_legacy_key(pb::ImportLegacyKeyRequest {
                    gateway: gw.into(),
                    name: format!("legacy{}", f.next()),
                    secret: format!("sk-legacy-secret-{:08}", f.next()),
                    limits: None,
                })
                .await,
        ),
        "GetKeyUsage" => code(c.keys.get_key_usage(pb::GetKeyUsageRequest { id: f.key(gw).await }).await),
        "RotateKey" => code(c.keys.rotate_key(pb::RotateKeyRequest { id: f.key(gw).await, grace_period: None }).await),
        "SetModelPrice" => code(
            c.prices
                .set_model_price(pb::SetModelPriceRequest {
                    price: Some(pb::ModelPrice {
                        model: format!("m{}", f.next()),
                        input_usd_per_million: "1".into(),
                        output_usd_per_million: "2".into(),
                    }),
                })
                .await,
        ),
        "ListModelPrices" => code(c.prices.list_model_prices(pb::ListModelPricesRequest {}).await),
        "DeleteModelPrice" => {
            let model = format!("m{}", f.next());
            let mut owner = f.owner.prices.clone();
            owner
                .set_model_price(pb::SetModelPriceRequest {
                    price: Some(pb::ModelPrice {
                        model: model.clone(),
                        input_usd_per_million: "1".into(),
                        output_usd_per_million: "1".into(),
                    }),
                })
                .await
                .unwrap();
            code(c.prices.delete_model_price(pb::DeleteModelPriceRequest { model }).await)
        }
        "CreateAccessToken" => code(
            c.access
                .create_access_token(pb::CreateAccessTokenRequest {
                    name: "made".into(),
                    role: pb::Role::Developer as i32,
                    gateways: vec![gw.into()],
                    expires_at: None,
                })
                .await,
        ),
        "ListAccessTokens" => code(c.access.list_access_tokens(pb::ListAccessTokensRequest {}).await),
        "RevokeAccessToken" => {
            let id = f.dev_token(gw).await;
            code(c.access.revoke_access_token(pb::RevokeAccessTokenRequest { id }).await)
        }
        "WhoAmI" => code(c.access.who_am_i(pb::WhoAmIRequest {}).await),
        "ListAuditEvents" => code(
            c.audit.list_audit_events(pb::ListAuditEventsRequest { gateway: gw.into(), ..Default::default() }).await,
        ),
        "GetUsageHistory" => code(
            c.usage.get_usage_history(pb::GetUsageHistoryRequest { gateway: gw.into(), ..Default::default() }).await,
        ),
        "GetUsageHistory/key" => code(
            c.usage
                .get_usage_history(pb::GetUsageHistoryRequest { key_id: f.key(gw).await, ..Default::default() })
                .await,
        ),
        other => panic!("no call for {other}"),
    }
}

#[tokio::test]
async fn every_rpc_every_role_in_and_out_of_scope() {
    let server = TestServer::start().await;
    let owner = clients(&server, OWNER_TOKEN).await;
    let f = Fixture { owner: owner.clone(), seq: Default::default() };
    for g in ["alpha", "beta"] {
        f.gateway(g).await;
    }
    // Scoped tokens reach "alpha" and the gateways they create under "alpha-…".
    let mut tokens = vec![("owner", false, owner.clone())];
    for (role, scoped) in [
        (pb::Role::Owner, true),
        (pb::Role::Admin, false),
        (pb::Role::Admin, true),
        (pb::Role::Developer, false),
        (pb::Role::Developer, true),
    ] {
        let gateways: Vec<String> = if scoped {
            let mut g = vec!["alpha".to_string(), "alpha-doomed".to_string()];
            g.extend((0..2000).map(|i| format!("alpha-new{i}")));
            g
        } else {
            vec![]
        };
        let mut a = owner.access.clone();
        let r = a
            .create_access_token(pb::CreateAccessTokenRequest {
                name: format!("{role:?}-{scoped}"),
                role: role as i32,
                gateways,
                expires_at: None,
            })
            .await
            .unwrap()
            .into_inner();
        let name = match role {
            pb::Role::Owner => "owner",
            pb::Role::Admin => "admin",
            _ => "developer",
        };
        tokens.push((name, scoped, clients(&server, &r.secret).await));
    }

    let mut checked = 0;
    let mut failures = Vec::new();
    for &(rpc, owner_may, admin_may, dev_may, scope) in RPCS {
        for (role, scoped, c) in &tokens {
            let may = match *role {
                "owner" => owner_may,
                "admin" => admin_may,
                _ => dev_may,
            };
            for gw in ["alpha", "beta"] {
                let want = if !may {
                    (Code::PermissionDenied, "You don't have access to this action")
                } else if *scoped && (scope == Global || (scope == Gateway && gw == "beta")) {
                    (Code::PermissionDenied, "You don't have access to this gateway")
                } else {
                    (Code::Ok, "")
                };
                let got = call(&f, c, rpc, gw).await;
                checked += 1;
                if (got.0, got.1.as_str()) != want {
                    failures.push(format!("{rpc} as {role} (scoped: {scoped}) on {gw}: got {got:?}, want {want:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} calls wrong:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(checked, RPCS.len() * 6 * 2);
}

#[tokio::test]
async fn scoped_tokens_see_only_their_gateways() {
    let server = TestServer::start().await;
    let owner = clients(&server, OWNER_TOKEN).await;
    let mut g = owner.gateways.clone();
    for name in ["alpha", "beta"] {
        g.create_gateway(gateway_req(name)).await.unwrap();
    }
    let mut a = owner.access.clone();
    let r = a
        .create_access_token(pb::CreateAccessTokenRequest {
            name: "dev-alpha".into(),
            role: pb::Role::Developer as i32,
            gateways: vec!["alpha".into()],
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.secret.starts_with("pcm_") && r.secret.len() == 42);
    let token = r.token.unwrap();
    assert_eq!(token.prefix, &r.secret[..12]);
    let mut dev = clients(&server, &r.secret).await;
    server.clock.advance(chrono::Duration::seconds(5));
    let names: Vec<String> = dev
        .gateways
        .list_gateways(pb::ListGatewaysRequest {})
        .await
        .unwrap()
        .into_inner()
        .gateways
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["alpha"]);
    let me = dev.access.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (me.id.as_str(), me.role, me.gateways.as_slice()),
        (token.id.as_str(), pb::Role::Developer as i32, &["alpha".to_string()][..])
    );
    assert!(me.last_used_at.is_some());
    // Listed tokens never show secrets.
    let listed = a.list_access_tokens(pb::ListAccessTokensRequest {}).await.unwrap().into_inner();
    assert!(listed.tokens.iter().any(|t| t.id == token.id));
    assert!(!format!("{listed:?}").contains(&r.secret[12..]));
    // A scoped owner cannot mint an unscoped token, nor one for another gateway.
    let r = a
        .create_access_token(pb::CreateAccessTokenRequest {
            name: "owner-alpha".into(),
            role: pb::Role::Owner as i32,
            gateways: vec!["alpha".into()],
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut scoped_owner = clients(&server, &r.secret).await;
    for gateways in [vec![], vec!["beta".to_string()], vec!["alpha".to_string(), "beta".to_string()]] {
        let s = scoped_owner
            .access
            .create_access_token(pb::CreateAccessTokenRequest {
                name: "wider".into(),
                role: pb::Role::Developer as i32,
                gateways: gateways.clone(),
                expires_at: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (s.code(), s.message()),
            (Code::PermissionDenied, "You don't have access to this gateway"),
            "{gateways:?}"
        );
    }
    // A token cannot mint a wider one.
    let s = dev
        .access
        .create_access_token(pb::CreateAccessTokenRequest {
            name: "x".into(),
            role: pb::Role::Developer as i32,
            gateways: vec![],
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "You don't have access to this action"));
    let s = a
        .create_access_token(pb::CreateAccessTokenRequest {
            name: "x".into(),
            role: 0,
            gateways: vec![],
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("role"));
}
