//! The admin listener's one HTTP service: gRPC as before, gRPC-Web for browsers, and the web
//! console's files (issue 10), all on one port and origin.
//!
//! A request goes to exactly one of three places, by its content type alone:
//! `application/grpc-web*` to tonic-web (which translates it to gRPC for the same services),
//! `application/grpc*` over HTTP/2 to the gRPC services, anything else to the console. The
//! console answers `GET`/`HEAD` only: its three files, and `index.html` for every other path
//! (the app's own routes, e.g. `/keys/<id>`), except paths shaped like a gRPC method
//! (`/<package.Service>/<Method>`), which are 404. Nothing here adds CORS headers: a page
//! of another origin cannot call the API (its preflight finds no
//! `Access-Control-Allow-Origin`).
//!
//! The files are compiled into the binary from `console/dist/` (built by the front end's
//! own toolchain and committed; building the crate needs no Node).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use http_body_util::Full;
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use tonic::codegen::{Bytes, Service};
use tonic::service::Routes;
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower_layer::Layer;

/// What every console response carries: only this origin's scripts, styles and API; no
/// framing, no forms, no inline code.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One of the console's files.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// `no-store` for `index.html` (it names the others, and a new release must be seen at
    /// once); `no-cache` for the others, which the browser revalidates by ETag.
    cache_control: &'static str,
    etag: fn() -> &'static str,
}

macro_rules! asset {
    ($file:literal, $type:literal, $cache:literal) => {{
        const BODY: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/dist/", $file));
        fn etag() -> &'static str {
            static TAG: OnceLock<String> = OnceLock::new();
            TAG.get_or_init(|| entity_tag(BODY))
        }
        Asset { body: BODY, content_type: $type, cache_control: $cache, etag }
    }};
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8", "no-store");
const APP_JS: Asset = asset!("app.js", "text/javascript; charset=utf-8", "no-cache");
const APP_CSS: Asset = asset!("app.css", "text/css; charset=utf-8", "no-cache");

/// A strong ETag: the first 16 bytes of the file's SHA-256, in hex.
fn entity_tag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    Grpc,
    GrpcWeb,
    Console,
}

fn destination(headers: &HeaderMap, version: Version) -> Destination {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if media.starts_with("application/grpc-web") {
        Destination::GrpcWeb
    } else if (media == "application/grpc" || media.starts_with("application/grpc+")) && version == Version::HTTP_2 {
        Destination::Grpc
    } else {
        Destination::Console
    }
}

/// What the console answers a `GET` of `path` with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Index,
    Script,
    Style,
    NotFound,
}

fn page(path: &str) -> Page {
    match path {
        "/app.js" => Page::Script,
        "/app.css" => Page::Style,
        "/" | "/index.html" => Page::Index,
        // `/<package.Service>/<Method>`: a gRPC method asked for without gRPC.
        _ if path.trim_start_matches('/').split_once('/').is_some_and(|(first, _)| first.contains('.')) => {
            Page::NotFound
        }
        _ => Page::Index,
    }
}

/// The console's answer to a request that is not gRPC (or gRPC-Web).
fn console_response(enabled: bool, method: &Method, path: &str, headers: &HeaderMap) -> Response<Body> {
    let asset = match (enabled, method) {
        (false, _) => None,
        (true, &Method::GET | &Method::HEAD) => match page(path) {
            Page::Index => Some(&INDEX),
            Page::Script => Some(&APP_JS),
            Page::Style => Some(&APP_CSS),
            Page::NotFound => None,
        },
        (true, _) => {
            let mut res = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return secured(res);
        }
    };
    let Some(asset) = asset else { return secured(plain(StatusCode::NOT_FOUND, "not found\n")) };
    let etag = (asset.etag)();
    let revalidated = asset.cache_control != "no-store"
        && headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == etag || t.trim() == "*");
    let (status, body) = if revalidated {
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else if method == Method::HEAD {
        (StatusCode::OK, Body::empty())
    } else {
        (StatusCode::OK, Body::new(Full::new(Bytes::from_static(asset.body))))
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(asset.cache_control));
    if status == StatusCode::OK {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
    }
    if let Ok(tag) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, tag);
    }
    secured(res)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::new(Full::new(Bytes::from_static(text.as_bytes()))));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Adds the headers every console response carries.
fn secured(mut res: Response<Body>) -> Response<Body> {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}

/// The admin listener's service: gRPC, gRPC-Web and (when `--console` is on) the console.
#[derive(Clone)]
pub struct AdminHttp {
    grpc: Routes,
    web: GrpcWebService<Routes>,
    console: bool,
}

impl AdminHttp {
    /// `routes`: the admin listener's gRPC services; `console`: whether to serve the console
    /// (off: every request that is not gRPC or gRPC-Web gets 404).
    pub fn new(routes: Routes, console: bool) -> AdminHttp {
        let routes = routes.prepare();
        AdminHttp { web: GrpcWebLayer::new().layer(routes.clone()), grpc: routes, console }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Body>> for AdminHttp {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call readies the service it goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Answer {
        match destination(req.headers(), req.version()) {
            Destination::Grpc => {
                let mut grpc = self.grpc.clone();
                Box::pin(async move {
                    std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut grpc, cx)).await?;
                    grpc.call(req).await
                })
            }
            Destination::GrpcWeb => {
                let mut web = self.web.clone();
                Box::pin(async move {
                    std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut web, cx)).await?;
                    web.call(req).await
                })
            }
            Destination::Console => {
                let res = console_response(self.console, req.method(), req.uri().path(), req.headers());
                Box::pin(std::future::ready(Ok(res)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        h
    }

    #[test]
    fn requests_go_by_content_type() {
        let h2 = Version::HTTP_2;
        assert_eq!(destination(&headers("application/grpc"), h2), Destination::Grpc);
        assert_eq!(destination(&headers("application/grpc+proto"), h2), Destination::Grpc);
        assert_eq!(destination(&headers("application/grpc-web+proto"), Version::HTTP_11), Destination::GrpcWeb);
        assert_eq!(destination(&headers("application/grpc-web-text"), h2), Destination::GrpcWeb);
        assert_eq!(destination(&headers("application/grpc"), Version::HTTP_11), Destination::Console);
        assert_eq!(destination(&headers("application/grpcx"), h2), Destination::Console);
        assert_eq!(destination(&HeaderMap::new(), h2), Destination::Console);
    }

    #[test]
    fn app_routes_get_the_index_and_grpc_paths_do_not() {
        assert_eq!(page("/"), Page::Index);
        assert_eq!(page("/keys/0190-abc"), Page::Index);
        assert_eq!(page("/usage/gpt-4.1"), Page::Index, "a dot past the first segment is the app's");
        assert_eq!(page("/app.js"), Page::Script);
        assert_eq!(page("/app.css"), Page::Style);
        assert_eq!(page("/portcullis.admin.v1.KeyService/ListKeys"), Page::NotFound);
        assert_eq!(page("/grpc.health.v1.Health/Check"), Page::NotFound);
    }

    #[test]
    fn every_console_response_is_secured_and_typed() {
        let get = |path: &str| console_response(true, &Method::GET, path, &HeaderMap::new());
        let index = get("/keys/abc");
        assert_eq!(index.status(), StatusCode::OK);
        assert_eq!(index.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(index.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        for res in [index, get("/app.js"), get("/x.y/z"), console_response(false, &Method::GET, "/", &HeaderMap::new())]
        {
            assert_eq!(res.headers()[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(res.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(res.headers()[header::REFERRER_POLICY], "no-referrer");
            assert!(res.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        }
        let options = console_response(true, &Method::OPTIONS, "/", &HeaderMap::new());
        assert_eq!(options.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn scripts_are_revalidated_by_etag() {
        let js = console_response(true, &Method::GET, "/app.js", &HeaderMap::new());
        let tag = js.headers()[header::ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, tag);
        let again = console_response(true, &Method::GET, "/app.js", &h);
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    }
}
