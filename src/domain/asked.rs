//! What a request asks of the provider, read from its body before it is sent: how many
//! output tokens it may be given, for how many choices, of which model, and how much
//! prompt text it carries. A reservation is made from it (see `check::reservation_for`).
//!
//! Read the way a lenient provider would read it, so that no way of writing a request
//! asks for more than it reserves: every output cap the body names counts, the largest
//! wins (also one key written twice, which a provider may read as its last); key names
//! with escapes are decoded; caps written as floats (`1e5`) or strings (`"100000"`)
//! count as numbers. A body that is not one JSON object (cut by Envoy at
//! `max_request_bytes`, or malformed) is scanned for the same fields and asks for at
//! least the default.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::estimate::ContentEstimate;
use super::usage::MAX_MODEL_NAME;

/// The model a request names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AskedModel {
    #[default]
    Unnamed,
    One(String),
    /// Different names (one key written twice): a provider may use either.
    Several,
}

impl AskedModel {
    fn add(&mut self, name: &str) {
        let name = truncated(name);
        *self = match std::mem::take(self) {
            AskedModel::Unnamed => AskedModel::One(name.to_string()),
            AskedModel::One(m) if m == name => AskedModel::One(m),
            _ => AskedModel::Several,
        };
    }
}

/// What one request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// The largest output cap named (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`); `None` when none is, or it is 0.
    pub output_cap: Option<u64>,
    /// Completions asked for: the largest of `n`, `best_of` and 1.
    pub choices: u64,
    pub model: AskedModel,
    /// The body was not one readable JSON object: fields after a cut are unknown.
    pub unreadable: bool,
    /// Bytes of prompt text (message contents, `input`, `prompt`, `system`, ...), with
    /// bytes the body had but Envoy did not send (`content-length` beyond what arrived)
    /// counted as text.
    pub prompt_bytes: u64,
}

impl Asked {
    /// Reads `body` (what Envoy sent, maybe cut) of a request whose `content-length` is
    /// `declared` when known.
    pub fn read(body: &[u8], declared: Option<u64>) -> Asked {
        let mut prompt = ContentEstimate::request();
        prompt.feed(body);
        let unsent = declared.unwrap_or(0).saturating_sub(body.len() as u64);
        let prompt_bytes = prompt.bytes().saturating_add(unsent);
        let fields = if body.is_empty() { Some(Fields::default()) } else { parse(body) };
        let unreadable = fields.is_none() || unsent > 0;
        let fields = fields.unwrap_or_else(|| scan(body));
        Asked {
            output_cap: fields.cap.filter(|&c| c > 0),
            choices: fields.choices.max(1),
            model: fields.model,
            unreadable,
            prompt_bytes,
        }
    }
}

#[derive(Debug, Default)]
struct Fields {
    cap: Option<u64>,
    choices: u64,
    model: AskedModel,
}

impl Fields {
    fn cap(&mut self, v: u64) {
        self.cap = Some(self.cap.map_or(v, |c| c.max(v)));
    }
}

/// A whole JSON object; `None` when the body is anything else.
fn parse(body: &[u8]) -> Option<Fields> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let fields = de.deserialize_map(Top).ok()?;
    de.end().ok()?;
    Some(fields)
}

struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::default();
        while let Some(name) = map.next_key::<Field>()? {
            match name {
                Field::Cap => {
                    if let Some(v) = map.next_value::<Count>()?.0 {
                        fields.cap(v);
                    }
                }
                Field::Choices => {
                    if let Some(v) = map.next_value::<Count>()?.0 {
                        fields.choices = fields.choices.max(v);
                    }
                }
                Field::Model => {
                    if let Some(m) = map.next_value::<Option<String>>()? {
                        fields.model.add(&m);
                    }
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

enum Field {
    Cap,
    Choices,
    Model,
    Other,
}

const CAPS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];
const CHOICES: [&str; 2] = ["n", "best_of"];

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Field, E> {
                Ok(if CAPS.contains(&s) {
                    Field::Cap
                } else if CHOICES.contains(&s) {
                    Field::Choices
                } else if s == "model" {
                    Field::Model
                } else {
                    Field::Other
                })
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// A count however a client writes it: an integer, a float (rounded up), or either in a
/// string; `None` for null. A negative count is 0. Anything else makes the body
/// unreadable.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(Some(u64::try_from(v).unwrap_or(0))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                from_float(v).map(|c| Count(Some(c))).ok_or_else(|| E::custom("not a count"))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Count, E> {
                number(s).map(|c| Count(Some(c))).ok_or_else(|| E::custom("not a count"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn from_float(v: f64) -> Option<u64> {
    // `as` saturates: 1e30 is u64::MAX.
    (!v.is_nan()).then(|| if v <= 0.0 { 0 } else { v.ceil() as u64 })
}

/// A count written as text: `100`, `"100"`, `1e5`, `12.5`, with spaces around.
fn number(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t.strip_prefix('"').and_then(|q| q.strip_suffix('"')).unwrap_or(t).trim();
    if t.is_empty() {
        return None;
    }
    match t.parse::<u64>() {
        Ok(v) => Some(v),
        Err(_) => t.parse::<f64>().ok().and_then(from_float),
    }
}

fn truncated(name: &str) -> &str {
    let mut end = name.len().min(MAX_MODEL_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The fields of a body that is not one whole JSON object, found by their names.
fn scan(body: &[u8]) -> Fields {
    let text = String::from_utf8_lossy(body);
    let mut fields = Fields::default();
    for name in CAPS {
        for v in raw_values(&text, name).filter_map(number) {
            fields.cap(v);
        }
    }
    for name in CHOICES {
        for v in raw_values(&text, name).filter_map(number) {
            fields.choices = fields.choices.max(v);
        }
    }
    for m in raw_values(&text, "model").filter_map(|v| v.strip_prefix('"')?.strip_suffix('"')) {
        fields.model.add(m);
    }
    fields
}

/// Every raw value after `"name":` in a JSON text, not inside a string as far as can be
/// told: a quoted string with its quotes, or the run of characters a number can have.
fn raw_values<'a>(text: &'a str, name: &str) -> impl Iterator<Item = &'a str> + 'a {
    let needle = format!("\"{name}\"");
    let mut from = 0;
    std::iter::from_fn(move || {
        while let Some(i) = text[from..].find(&needle) {
            let at = from + i;
            from = at + needle.len();
            if text[..at].ends_with('\\') {
                continue;
            }
            let Some(rest) = text[from..].trim_start().strip_prefix(':') else { continue };
            let rest = rest.trim_start();
            let end = match rest.strip_prefix('"') {
                Some(quoted) => match quoted.find('"') {
                    Some(e) => e + 2,
                    None => continue,
                },
                None => rest
                    .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
                    .unwrap_or(rest.len()),
            };
            return Some(&rest[..end]);
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(body: &str) -> Asked {
        Asked::read(body.as_bytes(), None)
    }

    fn one(m: &str) -> AskedModel {
        AskedModel::One(m.into())
    }

    #[test]
    fn caps_models_and_choices() {
        let a = asked(r#"{"model":"m","max_tokens":50,"messages":[{"role":"user","content":"hello"}]}"#);
        // "user" and "hello": every string value but the model's name is prompt.
        assert_eq!(a, Asked { output_cap: Some(50), choices: 1, model: one("m"), unreadable: false, prompt_bytes: 9 });
        assert_eq!(asked(r#"{"max_tokens":50,"max_completion_tokens":7}"#).output_cap, Some(50));
        assert_eq!(asked(r#"{"model":"gpt-4.1","max_output_tokens":9,"input":"xy"}"#).prompt_bytes, 2);
        assert_eq!(asked(r#"{"max_tokens":0}"#).output_cap, None, "0 is no cap");
        assert_eq!(asked(r#"{"max_tokens":null,"n":null}"#), asked("{}"));
        assert_eq!(asked(r#"{"n":3,"best_of":5}"#).choices, 5);
        assert_eq!(asked(r#"{"n":0}"#).choices, 1);
        assert_eq!(asked("").output_cap, None);
        assert!(!asked("").unreadable);
    }

    #[test]
    fn every_way_of_writing_a_cap_counts() {
        assert_eq!(asked(r#"{"max_tokens":1,"max_tokens":99999}"#).output_cap, Some(99999), "written twice");
        assert_eq!(asked(r#"{"max_completion_tokens":5,"max_tokens":900}"#).output_cap, Some(900));
        assert_eq!(asked(r#"{"max\u005ftokens":70000}"#).output_cap, Some(70000), "an escaped name");
        assert_eq!(asked(r#"{"max_tokens":1e5}"#).output_cap, Some(100_000), "a float");
        assert_eq!(asked(r#"{"max_tokens":12.5}"#).output_cap, Some(13), "rounded up");
        assert_eq!(asked(r#"{"max_tokens":"100000"}"#).output_cap, Some(100_000), "a string");
        assert_eq!(asked(r#"{"max_tokens":1e300}"#).output_cap, Some(u64::MAX), "saturated");
        assert_eq!(asked(r#"{"max_tokens":-5}"#).output_cap, None);
        assert_eq!(asked(r#"{"n":"4"}"#).choices, 4);
        let a = asked(r#"{"max_tokens":true}"#);
        assert!(a.unreadable, "a cap that is no number");
    }

    #[test]
    fn two_different_models_are_several() {
        assert_eq!(asked(r#"{"model":"cheap","model":"dear"}"#).model, AskedModel::Several);
        assert_eq!(asked(r#"{"model":"same","model":"same"}"#).model, one("same"));
        assert_eq!(asked(r#"{"model":null}"#).model, AskedModel::Unnamed);
        let long = "é".repeat(400);
        let AskedModel::One(m) = asked(&format!(r#"{{"model":"{long}"}}"#)).model else { panic!() };
        assert!(m.len() <= MAX_MODEL_NAME);
    }

    #[test]
    fn cut_and_malformed_bodies_are_scanned_and_flagged() {
        let cut = r#"{"model":"gpt-4o-mini","max_tokens":64,"n":2,"messages":[{"role":"user","content":"aaaa"#;
        let a = Asked::read(cut.as_bytes(), Some(cut.len() as u64 + 1000));
        assert_eq!(
            a,
            Asked { output_cap: Some(64), choices: 2, model: one("gpt-4o-mini"), unreadable: true, prompt_bytes: 1008 },
            "the unsent bytes count as prompt"
        );
        // A field name inside a string is not a field.
        let spaced = r#"{"model": "gpt-4o-mini", "max_tokens" : 64, "messages":[{"role":"user","content":"a long pro"#;
        assert_eq!((asked(spaced).output_cap, asked(spaced).model), (Some(64), one("gpt-4o-mini")));
        let tricky = r#"{"messages":[{"content":"say \"max_tokens\": 999999"}],"max_tokens":80,"#;
        assert_eq!(asked(tricky).output_cap, Some(80));
        assert_eq!(asked(r#"{"note":"max_tokens","max_tokens":1e4,"cut"#).output_cap, Some(10_000));
        assert_eq!(asked(r#"{"max_tokens":"2000","cut"#).output_cap, Some(2000));
        assert_eq!(asked(r#"{"model":"a","model":"b","x"#).model, AskedModel::Several);
        let garbage = asked("not json");
        assert_eq!((garbage.output_cap, garbage.unreadable), (None, true));
        assert!(asked(r#"[{"max_tokens":1}]"#).unreadable, "not an object");
        assert!(asked(r#"{"max_tokens":1} trailing"#).unreadable);
        // The whole body arrived: nothing unsent.
        assert!(!Asked::read(br#"{"max_tokens":1}"#, Some(16)).unreadable);
    }

    #[test]
    fn prompt_text_is_what_messages_carry() {
        let body = r#"{"model":"m","system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAAAAAAAAAA"}}]}]}"#;
        // "be brief", "user", "text", "abc", "image_url" (a type's name); not the image.
        assert_eq!(asked(body).prompt_bytes, 8 + 4 + 4 + 3 + 9, "images are not text");
        assert_eq!(asked(r#"{"prompt":"four"}"#).prompt_bytes, 4);
        // Text under any key, escaped or not, in arrays and in tools, is prompt.
        let hidden = r#"{"messages":[{"cont\u0065nt":"abcd"}],"input":["ef","gh"],"tools":[{"description":"ijkl"}]}"#;
        assert_eq!(asked(hidden).prompt_bytes, 4 + 2 + 2 + 4);
        assert_eq!(asked(r#"{"d\u0061ta":"xy"}"#).prompt_bytes, 2, "an escaped name is no payload's");
    }
}
