//! The admin listener serves the web console and gRPC-Web beside gRPC, on one port: real
//! HTTP/1.1 requests over loopback to a real server.

mod common;

use std::time::Duration;

use common::http::{Response, request};
use common::{OWNER_TOKEN, TestServer};
use portcullis::cli::BearerAuth;
use portcullis::pb;
use portcullis::pb::access_service_client::AccessServiceClient;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const WHO_AM_I: &str = "/portcullis.admin.v1.AccessService/WhoAmI";

fn admin_port(server: &TestServer) -> u16 {
    server.running().admin_addr.unwrap().port()
}

fn assert_secured(res: &Response) {
    assert_eq!(res.header("content-security-policy"), Some(CSP), "{res:?}");
    assert_eq!(res.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(res.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(res.header("access-control-allow-origin"), None);
}

/// A unary gRPC-Web call framed by hand: POST application/grpc-web+proto over HTTP/1.1.
async fn grpc_web(port: u16, path: &str, token: Option<&str>, message: &[u8], origin: Option<&str>) -> Response {
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/grpc-web+proto"), ("x-grpc-web", "1")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    if let Some(o) = origin {
        headers.push(("origin", o));
    }
    request(port, "POST", "127.0.0.1", path, &headers, Some(std::str::from_utf8(&body).unwrap())).await
}

/// The message and the grpc-status of a gRPC-Web response (trailers in the body, or in the
/// headers for a trailers-only answer).
fn grpc_web_result(res: &Response) -> (Option<Vec<u8>>, String) {
    let (mut message, mut status) = (None, res.header("grpc-status").map(str::to_string));
    let mut rest = res.bytes.as_slice();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let frame = &rest[5..5 + len];
        if rest[0] & 0x80 == 0 {
            message = Some(frame.to_vec());
        } else {
            let trailers = String::from_utf8_lossy(frame);
            for line in trailers.split("\r\n") {
                if let Some((k, v)) = line.split_once(':')
                    && k.trim().eq_ignore_ascii_case("grpc-status")
                {
                    status = Some(v.trim().to_string());
                }
            }
        }
        rest = &rest[5 + len..];
    }
    (message, status.unwrap_or_default())
}

#[tokio::test]
async fn a_grpc_web_call_over_http1_succeeds_with_a_token_and_is_unauthenticated_without() {
    let server = TestServer::start().await;
    let port = admin_port(&server);

    let res = grpc_web(port, WHO_AM_I, Some(OWNER_TOKEN), &[], None).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.header("content-type").unwrap().starts_with("application/grpc-web"), "{res:?}");
    let (message, status) = grpc_web_result(&res);
    assert_eq!(status, "0", "{res:?}");
    let me = pb::AccessToken::decode(message.expect("a message").as_slice()).unwrap();
    assert_eq!(me.role, pb::Role::Owner as i32);

    let res = grpc_web(port, WHO_AM_I, None, &[], None).await;
    let (message, status) = grpc_web_result(&res);
    assert_eq!(status, "16", "UNAUTHENTICATED: {res:?}");
    assert!(message.is_none());
    let res = grpc_web(port, WHO_AM_I, Some("pcm_not-a-real-token"), &[], None).await;
    assert_eq!(grpc_web_result(&res).1, "16");
}

#[tokio::test]
async fn deep_links_get_the_index_with_the_security_headers_and_assets_their_types() {
    let server = TestServer::start().await;
    let port = admin_port(&server);

    for (path, accept) in [("/keys/abc", "text/html"), ("/", "*/*"), ("/gateways/prod/keys?x=1", "application/json")] {
        let res = request(port, "GET", "127.0.0.1", path, &[("accept", accept)], None).await;
        assert_eq!(res.status, 200, "{path}: {res:?}");
        assert_eq!(res.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(res.header("cache-control"), Some("no-store"));
        assert!(res.body.contains("/app.js"), "{}", res.body);
        assert_secured(&res);
    }

    let js = request(port, "GET", "127.0.0.1", "/app.js", &[], None).await;
    assert_eq!(js.status, 200);
    assert_eq!(js.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert_secured(&js);
    let etag = js.header("etag").expect("an etag").to_string();
    let again = request(port, "GET", "127.0.0.1", "/app.js", &[("if-none-match", &etag)], None).await;
    assert_eq!(again.status, 304);
    assert_secured(&again);

    let css = request(port, "GET", "127.0.0.1", "/app.css", &[], None).await;
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert_secured(&css);

    // A gRPC method asked for without gRPC is not the app's.
    let res = request(port, "GET", "127.0.0.1", WHO_AM_I, &[], None).await;
    assert_eq!(res.status, 404);
    assert_secured(&res);
    let res = request(port, "POST", "127.0.0.1", "/keys/abc", &[], Some("x")).await;
    assert_eq!(res.status, 405);
    assert_secured(&res);
}

#[tokio::test]
async fn other_origins_get_no_cors_headers() {
    let server = TestServer::start().await;
    let port = admin_port(&server);
    let preflight = [
        ("origin", "https://evil.example"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization,content-type,x-grpc-web"),
    ];
    for path in [WHO_AM_I, "/"] {
        let res = request(port, "OPTIONS", "127.0.0.1", path, &preflight, None).await;
        assert_ne!(res.status / 100, 2, "a preflight is not approved: {res:?}");
        assert_eq!(res.header("access-control-allow-origin"), None, "{res:?}");
        assert_eq!(res.header("access-control-allow-methods"), None);
        assert_eq!(res.header("access-control-allow-headers"), None);
    }
    // Even a call the browser would not have sent: nothing lets the page read it.
    let res = grpc_web(port, WHO_AM_I, Some(OWNER_TOKEN), &[], Some("https://evil.example")).await;
    assert_eq!(res.header("access-control-allow-origin"), None, "{res:?}");
}

#[tokio::test]
async fn with_the_console_off_pages_are_404_and_grpc_and_grpc_web_still_work() {
    let server = TestServer::start_with(&["--console=false"]).await;
    let port = admin_port(&server);
    for path in ["/", "/keys/abc", "/app.js"] {
        let res = request(port, "GET", "127.0.0.1", path, &[], None).await;
        assert_eq!(res.status, 404, "{path}");
        assert_eq!(res.header("access-control-allow-origin"), None);
    }
    let mut access =
        AccessServiceClient::with_interceptor(server.channel().await, BearerAuth::new(OWNER_TOKEN).unwrap());
    let me = access.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(me.role, pb::Role::Owner as i32);
    let res = grpc_web(port, WHO_AM_I, Some(OWNER_TOKEN), &[], None).await;
    assert_eq!(grpc_web_result(&res).1, "0");
}

#[tokio::test]
async fn grpc_over_http2_is_unchanged_beside_the_console() {
    let server = TestServer::start().await;
    let mut access =
        AccessServiceClient::with_interceptor(server.channel().await, BearerAuth::new(OWNER_TOKEN).unwrap());
    let me = access.who_am_i(pb::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(me.role, pb::Role::Owner as i32);
    let mut anonymous = AccessServiceClient::new(server.channel().await);
    let err = anonymous.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn an_http1_client_that_never_finishes_its_request_head_is_closed_at_the_handshake_timeout() {
    let server = TestServer::start_with(&["--handshake-timeout", "300ms"]).await;
    let mut s = TcpStream::connect(("127.0.0.1", admin_port(&server))).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed without an answer: {read:?}");
}

#[tokio::test]
async fn over_tls_a_browser_speaking_http1_gets_the_console() {
    use std::sync::Arc;
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName, pki_types::pem::PemObject};
    let certs = common::tls::TestCerts::generate();
    let server = TestServer::start_with(&[
        "--admin-tls-cert",
        &certs.arg("server.pem"),
        "--admin-tls-key",
        &certs.arg("server-key.pem"),
    ])
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", admin_port(&server))).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN offers HTTP/1.1 beside h2");
    tls.write_all(b"GET /keys/abc HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("content-security-policy: default-src 'none'") && text.contains("/app.js"), "{text}");
}
