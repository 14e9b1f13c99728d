//! Fuzzing on the stable toolchain: property tests over arbitrary input for the usage
//! parser, the Check request parsing and secrets. `cargo test` runs proptest's default
//! 256 cases per property (a few seconds); run longer with
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz_parsers`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use chrono::{TimeZone, Utc};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, OkHttpResponse};
use portcullis::authz::{AuthzService, CheckInput};
use portcullis::domain::asked::Asked;
use portcullis::domain::budget::Hold;
use portcullis::domain::check::Limiters;
use portcullis::domain::clock::ManualClock;
use portcullis::domain::counters::now_or_never;
use portcullis::domain::estimate;
use portcullis::domain::gateway::{Gateway, InboundAuth, KeyLocation, UpstreamAuth};
use portcullis::domain::key::{ApiKey, Limits};
use portcullis::domain::pricing::Price;
use portcullis::domain::request;
use portcullis::domain::secret::{self, Secret, SecretHash, SecretKind, Shape};
use portcullis::domain::tokens::TokenRegistry;
use portcullis::domain::usage::{Reported, UsageParser};
use portcullis::domain::view::{KeySecret, View};
use portcullis::state::Shared;
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------- the usage parser

fn content_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("application/json".to_string()),
        Just("text/event-stream".to_string()),
        Just("Text/Event-Stream; charset=utf-8".to_string()),
        Just(String::new()),
        Just("audio/mpeg".to_string()),
        any::<String>(),
    ]
}

/// Bodies made of the pieces event streams and JSON are made of, and arbitrary bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"event: message_delta\n".to_vec()),
        Just(b": keep-alive\n".to_vec()),
        Just(br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}"#.to_vec()),
        Just(br#"{"message":{"model":"c","usage":{"input_tokens":5,"output_tokens":1}}}"#.to_vec()),
        Just(br#"{"usage":{"output_tokens":9}}"#.to_vec()),
        Just(br#""usage""#.to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..32),
    ];
    proptest::collection::vec(piece, 0..48).prop_map(|pieces| pieces.concat())
}

/// Cut points into a body of `len` bytes, in order.
fn cuts(indices: &[Index], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = indices.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

fn parse(mut p: UsageParser, body: &[u8], cuts: &[usize]) -> Reported {
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        p.feed(&body[last..c]);
        last = c;
    }
    p.finish()
}

fn well_formed() -> impl Strategy<Value = (String, Vec<u8>, Reported)> {
    let model = "[a-z0-9.-]{1,20}";
    (0u8..3, model, 0u32..1_000_000, 0u32..1_000_000, 0usize..5, any::<bool>()).prop_map(
        |(style, model, prompt, completion, filler, crlf)| {
            let nl = if crlf { "\r\n" } else { "\n" };
            let expect = Reported {
                model: Some(model.clone()),
                prompt_tokens: prompt.into(),
                completion_tokens: completion.into(),
                found: true,
                last: true,
            };
            let filler_event = |i: usize| {
                format!(r#"data: {{"model":"{model}","choices":[{{"delta":{{"content":"word {i} \"usage\""}}}}]}}{nl}{nl}"#)
            };
            let body = match style {
                0 => format!(
                    r#"{{"id":"x","model":"{model}","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion}}}}}"#
                ),
                1 => {
                    let mut s: String = (0..filler).map(filler_event).collect();
                    s.push_str(&format!(
                        r#"data: {{"model":"{model}","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion}}}}}{nl}{nl}data: [DONE]{nl}{nl}"#
                    ));
                    s
                }
                _ => {
                    let mut s = format!(
                        r#"event: message_start{nl}data: {{"type":"message_start","message":{{"model":"{model}","usage":{{"input_tokens":{prompt},"output_tokens":1}}}}}}{nl}{nl}"#
                    );
                    for i in 0..filler {
                        s.push_str(&format!(r#"event: content_block_delta{nl}data: {{"delta":{{"text":"{i}"}}}}{nl}{nl}"#));
                    }
                    s.push_str(&format!(
                        r#"event: message_delta{nl}data: {{"type":"message_delta","usage":{{"output_tokens":{completion}}}}}{nl}{nl}"#
                    ));
                    s
                }
            };
            let ct = if style == 0 { "application/json" } else { "text/event-stream" };
            (ct.to_string(), body.into_bytes(), expect)
        },
    )
}

proptest! {
    /// Any bytes, any content type, any split: no panic, and the split changes nothing.
    #[test]
    fn usage_parser_reads_any_input_the_same_whatever_the_split(
        ct in content_type(),
        body in body(),
        split in proptest::collection::vec(any::<Index>(), 0..6),
    ) {
        let whole = parse(UsageParser::new(&ct), &body, &[]);
        let cut = parse(UsageParser::new(&ct), &body, &cuts(&split, body.len()));
        prop_assert_eq!(whole, cut);
    }

    /// Well-formed JSON and SSE bodies report exactly their usage at any split.
    #[test]
    fn usage_parser_reads_well_formed_bodies_at_any_split(
        (ct, body, expect) in well_formed(),
        split in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        prop_assert_eq!(parse(UsageParser::new(&ct), &body, &cuts(&split, body.len())), expect);
    }
}

// ---------------------------------------------------------------- Check request parsing

/// Three gateways (a header key, a query key with a provider key, `authorization` with a
/// provider key), a key of ours on each and a legacy key.
struct World {
    service: AuthzService,
    /// Secrets of our format, by gateway: hdr, qry, auth.
    ours: Vec<String>,
    legacy: String,
    /// key id -> its secret and gateway.
    by_id: HashMap<String, (String, &'static str)>,
}

const LEGACY: &str = "legacy-secret-0123456789";

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let now = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
        let gateway = |name: &str, inbound: InboundAuth, upstream: Option<UpstreamAuth>| Gateway {
            id: uuid::Uuid::now_v7(),
            name: name.into(),
            inbound,
            upstream,
            default_reservation_tokens: 10,
            created_at: now,
        };
        let provider = || Some(UpstreamAuth::new("authorization", "Bearer sk-provider").unwrap());
        let gateways = vec![
            gateway("hdr", InboundAuth::default(), None),
            gateway("qry", InboundAuth::new("api_key", KeyLocation::Query).unwrap(), provider()),
            gateway("auth", InboundAuth::new("authorization", KeyLocation::Header).unwrap(), provider()),
        ];
        let key = |g: &Gateway, secret: &Secret, legacy: bool, limits: Limits| ApiKey {
            id: uuid::Uuid::now_v7(),
            gateway_id: g.id,
            name: format!("k-{}", g.name),
            prefix: secret.display_prefix(),
            enabled: true,
            legacy,
            limits,
            created_at: now,
            expires_at: None,
            last_used_at: None,
        };
        let mut keys = Vec::new();
        let mut ours = Vec::new();
        let mut by_id = HashMap::new();
        for (i, (g, name)) in gateways.iter().zip(["hdr", "qry", "auth"]).enumerate() {
            let s = Secret::generate(SecretKind::ApiKey);
            let limits = if i == 0 {
                Limits { token_limit: Some(u64::MAX / 4), ..Default::default() }
            } else {
                Limits::default()
            };
            let k = key(g, &s, false, limits);
            by_id.insert(k.id.to_string(), (s.expose().to_string(), name));
            keys.push((k, vec![KeySecret::current(s.hash())]));
            ours.push(s.expose().to_string());
        }
        let legacy = Secret::from_plaintext(LEGACY);
        let k = key(&gateways[0], &legacy, true, Limits::default());
        by_id.insert(k.id.to_string(), (LEGACY.to_string(), "hdr"));
        keys.push((k, vec![KeySecret::current(legacy.hash())]));
        let view = View::new(gateways, keys);
        let tokens = TokenRegistry::new(vec![], false, chrono::Duration::hours(1));
        let shared = Shared::new(view, tokens, Limiters::default(), Arc::new(ManualClock::new(now)));
        World { service: AuthzService::new(Arc::new(shared)), ours, legacy: LEGACY.to_string(), by_id }
    })
}

/// A header or query value: one of the world's secrets in some form, or text.
#[derive(Debug, Clone)]
enum Val {
    Ours(usize),
    Bearer(usize),
    Legacy,
    Joined(usize, usize),
    Wrapped(String, usize),
    Text(String),
}

fn val() -> impl Strategy<Value = Val> {
    prop_oneof![
        (0usize..3).prop_map(Val::Ours),
        (0usize..3).prop_map(Val::Bearer),
        Just(Val::Legacy),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Val::Joined(a, b)),
        ("[ %,;=&a-zA-Z]{0,4}", 0usize..3).prop_map(|(s, i)| Val::Wrapped(s, i)),
        any::<String>().prop_map(Val::Text),
        "[a-zA-Z0-9 %+,;=&_-]{0,20}".prop_map(Val::Text),
    ]
}

fn resolve(v: &Val, w: &World) -> String {
    match v {
        Val::Ours(i) => w.ours[*i].clone(),
        Val::Bearer(i) => format!("Bearer {}", w.ours[*i]),
        Val::Legacy => w.legacy.clone(),
        Val::Joined(a, b) => format!("{},{}", w.ours[*a], w.ours[*b]),
        Val::Wrapped(s, i) => format!("{s}{}{s}", w.ours[*i]),
        Val::Text(t) => t.clone(),
    }
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x-api-key".to_string()),
        Just("X-Api-Key".to_string()),
        Just("authorization".to_string()),
        Just("api_key".to_string()),
        Just("x-other".to_string()),
        "[a-z_-]{1,12}",
    ]
}

fn query_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("api_key".to_string()),
        Just("API_KEY".to_string()),
        Just("api%5Fkey".to_string()),
        Just("api_key+".to_string()),
        Just("x".to_string()),
        "[a-zA-Z0-9_%+.;=-]{0,10}",
    ]
}

#[derive(Debug, Clone)]
struct Req {
    gateway: &'static str,
    headers: Vec<(String, Val)>,
    query: Option<Vec<(String, Option<Val>, bool)>>,
    raw_encoding: bool,
    body: Vec<u8>,
}

fn req() -> impl Strategy<Value = Req> {
    let pair = (query_name(), proptest::option::of(val()), any::<bool>());
    (
        prop_oneof![Just("hdr"), Just("qry"), Just("auth"), Just("nope")],
        proptest::collection::vec((header_name(), val()), 0..5),
        proptest::option::of(proptest::collection::vec(pair, 0..5)),
        any::<bool>(),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (any::<u64>(), "[a-z0-9-]{0,10}")
                .prop_map(|(n, m)| format!(r#"{{"model":"{m}","max_tokens":{n}}}"#).into_bytes()),
        ],
    )
        .prop_map(|(gateway, headers, query, raw_encoding, body)| Req {
            gateway,
            headers,
            query,
            raw_encoding,
            body,
        })
}

/// The request as Envoy would send it, and the (name, value) headers and path it carries.
fn check_request(r: &Req, w: &World) -> (CheckRequest, Vec<(String, String)>, String) {
    let mut path = "/v1/chat/completions".to_string();
    if let Some(q) = &r.query {
        path.push('?');
        for (i, (name, value, semicolon)) in q.iter().enumerate() {
            if i > 0 {
                path.push(if *semicolon { ';' } else { '&' });
            }
            path.push_str(name);
            if let Some(v) = value {
                path.push('=');
                path.push_str(&resolve(v, w));
            }
        }
    }
    let mut headers: Vec<(String, String)> =
        vec![(":path".into(), path.clone()), (":method".into(), "POST".into()), (":authority".into(), "x".into())];
    // Envoy lowercases header names.
    headers.extend(r.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), resolve(v, w))));
    let mut http = HttpRequest { path: path.clone(), raw_body: r.body.clone(), ..Default::default() };
    if r.raw_encoding {
        let entries = headers
            .iter()
            .map(|(k, v)| HeaderValue { key: k.clone(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        http.header_map = Some(HeaderMap { headers: entries });
    } else {
        for (k, v) in &headers {
            http.headers.entry(k.clone()).and_modify(|j| *j = format!("{j},{v}")).or_insert_with(|| v.clone());
        }
    }
    let attributes = AttributeContext {
        request: Some(AttrRequest { http: Some(http), ..Default::default() }),
        context_extensions: HashMap::from([("gateway".to_string(), r.gateway.to_string())]),
        ..Default::default()
    };
    (CheckRequest { attributes: Some(attributes) }, headers, path)
}

/// What the provider receives once Envoy applied an allow: headers without the removed
/// ones and with the set ones; the path without the removed query parameters (Envoy
/// splits the query at `&` and removes parameters whose raw name matches).
fn upstream_view(ok: &OkHttpResponse, headers: &[(String, String)], path: &str) -> (Vec<(String, String)>, String) {
    let set: Vec<(String, String)> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.to_ascii_lowercase(), h.value.clone()))
        .collect();
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| k != ":path" && !ok.headers_to_remove.contains(k) && !set.iter().any(|(s, _)| s == k))
        .cloned()
        .collect();
    out.extend(set);
    let path = match path.split_once('?') {
        None => path.to_string(),
        Some((p, q)) => {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|pair| {
                    let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
                    !ok.query_parameters_to_remove.iter().any(|r| r == name)
                })
                .collect();
            format!("{p}?{}", kept.join("&"))
        }
    };
    (out, path)
}

proptest! {
    /// Any headers (repeated, in either encoding), query and body: no panic; an allow
    /// only with a valid key; and once allowed, neither that key nor any key of ours
    /// is left anywhere Envoy would pass to the provider.
    #[test]
    fn check_never_allows_without_a_key_and_never_leaks_one(r in req()) {
        let w = world();
        let (request, headers, path) = check_request(&r, w);
        let response = now_or_never(w.service.decide(&CheckInput::of(&request))).expect("in-process counters answer at once").to_response();
        let Some(HttpResponse::OkResponse(ok)) = &response.http_response else { return Ok(()) };
        let everything = format!("{headers:?}{path}");
        let key_id = response.dynamic_metadata.as_ref().and_then(|m| m.fields.get("key_id")).and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
        let (secret, gateway) = key_id.and_then(|id| w.by_id.get(&id)).expect("an allow names a known key");
        prop_assert_eq!(*gateway, r.gateway, "a key of another gateway was allowed");
        prop_assert!(everything.contains(secret.as_str()), "allowed without its key: {r:?}");
        let (up_headers, up_path) = upstream_view(ok, &headers, &path);
        let decoded = request::percent_decode(&up_path).into_owned();
        for s in w.ours.iter().chain([secret]) {
            for (k, v) in &up_headers {
                prop_assert!(!v.contains(s.as_str()), "key left in header {k}: {r:?}");
            }
            prop_assert!(!up_path.contains(s.as_str()) && !decoded.contains(s.as_str()), "key left in {up_path}: {r:?}");
        }
    }

    /// The pieces Check is made of never panic on any input.
    #[test]
    fn check_parsers_take_any_text(text in any::<String>(), name in any::<String>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = request::strip_bearer(&text);
        let _ = request::percent_decode(&text);
        let _ = request::query_param(&text, &name);
        let _ = request::query_param(&format!("/?{text}"), "api_key");
        let _ = Asked::read(&body, None);
        let _ = Asked::read(text.as_bytes(), Some(body.len() as u64));
    }

    /// A response whose usage is missing, partial or cut is never charged less than its
    /// reservation held, nor less than it reported, whatever the numbers.
    #[test]
    fn an_unreported_charge_covers_the_hold(
        prompt in any::<u64>(), completion in any::<u64>(), found in any::<bool>(), last in any::<bool>(),
        estimate in any::<u64>(), tokens in any::<u64>(), micros in any::<i64>(), prompt_tokens in any::<u64>(),
        price in proptest::option::of((0i64..1_000_000_000, 0i64..1_000_000_000)),
    ) {
        let reported = Reported { model: None, prompt_tokens: prompt, completion_tokens: completion, found, last };
        let price = price.map(|(i, o)| Price { input_micros_per_million: i, output_micros_per_million: o });
        let hold = Hold { tokens, micros, prompt_tokens };
        let m = estimate::charge_unreported(&reported, estimate, price.as_ref(), Some(hold));
        prop_assert!(m.prompt_tokens.saturating_add(m.completion_tokens) >= tokens);
        prop_assert!(m.prompt_tokens >= prompt_tokens && m.completion_tokens >= estimate);
        prop_assert!(m.cost_micros >= micros.max(0));
        if found {
            prop_assert!(m.prompt_tokens >= prompt && m.completion_tokens >= completion);
        }
    }

    /// However a request writes its output cap (an integer, a float, a string, an escaped
    /// name, twice, beside other caps, cut short), it never asks for less than it names.
    #[test]
    fn no_way_of_writing_a_cap_reserves_less(
        cap in 1u64..10_000_000,
        other in 0u64..10_000_000,
        form in 0usize..5,
        name in 0usize..3,
        twice in any::<bool>(),
        cut in any::<bool>(),
        n in 0u64..5,
    ) {
        let key = ["max_tokens", "max_completion_tokens", "max_output_tokens"][name];
        let value = match form {
            0 => cap.to_string(),
            1 => format!("\"{cap}\""),
            2 => format!("{}e0", cap),
            3 => format!("{}.0", cap),
            _ => format!("{cap}"),
        };
        let key = if form == 4 { key.replace('_', "\\u005f") } else { key.to_string() };
        let mut body = format!(r#"{{"model":"m","n":{n},"{key}":{value}"#);
        if twice {
            body = format!(r#"{{"max_tokens":{other},{}"#, &body[1..]);
        }
        body.push_str(r#","messages":[{"role":"user","content":"hello"}]}"#);
        if cut {
            body.truncate(body.len() - 10);
        }
        let asked = Asked::read(body.as_bytes(), None);
        prop_assert!(asked.output_cap.unwrap_or(0) >= cap || (cut && asked.unreadable && form == 4), "{body}: {asked:?}");
        prop_assert!(asked.choices >= n.max(1), "{body}: {asked:?}");
    }
}

// ---------------------------------------------------------------- secrets

fn kind() -> impl Strategy<Value = SecretKind> {
    prop_oneof![Just(SecretKind::ApiKey), Just(SecretKind::AccessToken)]
}

proptest! {
    /// Any string has a shape; only our prefix can be a bad checksum.
    #[test]
    fn any_string_has_a_shape(text in any::<String>(), kind in kind(), tail in "[a-zA-Z0-9]{0,44}") {
        let shape = secret::shape(&text, kind);
        prop_assert!(shape != Shape::BadChecksum || text.starts_with(kind.prefix()));
        let ours = format!("{}{tail}", kind.prefix());
        prop_assert!(secret::shape(&ours, kind) != Shape::Foreign);
        let _ = SecretHash::of(&text);
    }

    /// A generated secret reads back as valid, hashes as its text, and any one-character
    /// change to it fails the checksum.
    #[test]
    fn generated_secrets_round_trip(kind in kind(), at in any::<Index>(), with in "[a-zA-Z0-9]") {
        let s = Secret::generate(kind);
        let text = s.expose();
        prop_assert_eq!(text.len(), kind.secret_len());
        prop_assert_eq!(secret::shape(text, kind), Shape::Valid);
        prop_assert_eq!(s.hash(), SecretHash::of(text));
        prop_assert_eq!(&Secret::from_plaintext(text), &s);
        prop_assert_eq!(s.display_prefix(), &text[..secret::DISPLAY_PREFIX_LEN]);
        let i = kind.prefix().len() + at.index(text.len() - kind.prefix().len());
        if text[i..=i] != with {
            let typo = format!("{}{with}{}", &text[..i], &text[i + 1..]);
            prop_assert_eq!(secret::shape(&typo, kind), Shape::BadChecksum);
        }
    }
}
