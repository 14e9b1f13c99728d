//! Reads what a response says it used: `usage` from JSON bodies and from
//! `text/event-stream` bodies (OpenAI's final usage chunk; Anthropic's
//! `message_start` / `message_delta`; OpenAI Responses' `response.completed`), with
//! chunk boundaries anywhere.
//!
//! A lexical scan, not a parse: the parser walks the bytes once, keeps the nesting of the
//! objects it is in (to a fixed depth), the last key, and the few numbers and the model
//! name it wants, and skips everything else (string contents with `memchr`). So its
//! memory is constant whatever the provider sends: a 1 GB JSON body or an event that
//! never ends costs no more than a small one, no response is left unread for lack of
//! room, and one client's huge responses cannot starve another's metering.

/// A response's model name is kept to this many bytes (prices name at most 200), so a
/// provider's odd value cannot grow logs or labels.
pub const MAX_MODEL_NAME: usize = 256;
/// Nesting deeper than this is walked but not looked into (usage sits at depth 2 or 3).
const MAX_DEPTH: usize = 8;
/// Keys longer than this are none of the ones we want.
const KEY_CAP: usize = 32;

/// Usage a response reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reported {
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Whether any usage was found at all.
    pub found: bool,
    /// Whether the usage found is a final count: the last `usage` object read was not
    /// Anthropic's `message_start` one (which says 1 output token before any is written).
    pub last: bool,
}

/// Where a container sits: what the objects we look into are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The body, or an event's data.
    Top,
    /// Anthropic's `message` (in `message_start`).
    Message,
    /// OpenAI Responses' `response`.
    Response,
    /// A `usage` object of one of the above.
    Usage,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Between,
    /// Inside a string.
    Str,
    /// Inside a number.
    Num,
}

/// What the string being read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrUse {
    /// A key: its first bytes are kept in `key`.
    Key,
    /// The model name: kept in `model` up to `MAX_MODEL_NAME` bytes.
    Model,
    /// Anything else: skipped.
    Skip,
}

/// The numbers of one `usage` object.
#[derive(Debug, Clone, Copy, Default)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cached: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsageKey {
    Prompt,
    Input,
    Completion,
    Output,
    Cached,
}

fn usage_key(key: &[u8]) -> Option<UsageKey> {
    Some(match key {
        b"prompt_tokens" => UsageKey::Prompt,
        b"input_tokens" => UsageKey::Input,
        b"completion_tokens" => UsageKey::Completion,
        b"output_tokens" => UsageKey::Output,
        // Anthropic reports prompt-cache tokens beside input_tokens; they are prompt too.
        b"cache_creation_input_tokens" | b"cache_read_input_tokens" => UsageKey::Cached,
        _ => return None,
    })
}

/// A lexical reader of JSON values for their usage and model, fed in pieces.
#[derive(Debug, Clone)]
struct JsonUsage {
    /// Open containers: their role and whether they are objects.
    stack: [(Role, bool); MAX_DEPTH],
    depth: usize,
    lex: Lex,
    str_use: StrUse,
    escape: bool,
    /// Hex digits of a `\uXXXX` escape in the model name still to read, and its value.
    unicode_left: u8,
    unicode: u32,
    /// In an object, before a key (after `{` or `,`).
    expect_key: bool,
    key: [u8; KEY_CAP],
    /// Bytes of the key being read or last read; `KEY_CAP + 1` once it is none we want.
    key_len: usize,
    /// The number being read, if it is one we want and still a whole one.
    number: Option<u64>,
    number_for: Option<UsageKey>,
    usage: UsageFields,
    usage_role: Role,
    model: Option<Vec<u8>>,
    reported: Reported,
}

impl Default for JsonUsage {
    fn default() -> Self {
        JsonUsage {
            stack: [(Role::Other, false); MAX_DEPTH],
            depth: 0,
            lex: Lex::Between,
            str_use: StrUse::Skip,
            escape: false,
            unicode_left: 0,
            unicode: 0,
            expect_key: false,
            key: [0; KEY_CAP],
            key_len: KEY_CAP + 1,
            number: None,
            number_for: None,
            usage: UsageFields::default(),
            usage_role: Role::Other,
            model: None,
            reported: Reported::default(),
        }
    }
}

impl JsonUsage {
    /// The container the reader is in, if it is looked into.
    fn current(&self) -> Option<(Role, bool)> {
        match self.depth {
            0 => None,
            d if d <= MAX_DEPTH => Some(self.stack[d - 1]),
            _ => Some((Role::Other, false)),
        }
    }

    fn last_key(&self) -> &[u8] {
        if self.key_len <= KEY_CAP { &self.key[..self.key_len] } else { b"" }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            match self.lex {
                Lex::Str => {
                    if self.unicode_left > 0 {
                        // `\uXXXX` in the model name (nowhere else is it decoded).
                        self.unicode_left -= 1;
                        self.unicode = (self.unicode << 4) | (b as char).to_digit(16).unwrap_or(0);
                        if self.unicode_left == 0 {
                            let c = char::from_u32(self.unicode).unwrap_or(char::REPLACEMENT_CHARACTER);
                            for &b in c.encode_utf8(&mut [0; 4]).as_bytes() {
                                self.model_byte(b);
                            }
                        }
                        bytes = rest;
                        continue;
                    }
                    if self.escape {
                        self.escape = false;
                        // An escaped key is none we want; an escape in the model name is decoded.
                        match self.str_use {
                            StrUse::Key => self.key_len = KEY_CAP + 1,
                            StrUse::Model => match b {
                                b'u' => (self.unicode_left, self.unicode) = (4, 0),
                                b'n' => self.model_byte(b'\n'),
                                b't' => self.model_byte(b'\t'),
                                b'r' => self.model_byte(b'\r'),
                                b'b' => self.model_byte(8),
                                b'f' => self.model_byte(12),
                                _ => self.model_byte(b),
                            },
                            StrUse::Skip => {}
                        }
                        bytes = rest;
                        continue;
                    }
                    if self.str_use == StrUse::Skip {
                        // Skip to the next quote or backslash at once.
                        match memchr::memchr2(b'"', b'\\', bytes) {
                            Some(i) => bytes = &bytes[i..],
                            None => return,
                        }
                        let (&b, rest) = bytes.split_first().expect("memchr found a byte");
                        self.string_byte(b);
                        bytes = rest;
                        continue;
                    }
                    self.string_byte(b);
                }
                Lex::Num => {
                    if b.is_ascii_digit() {
                        self.number = self.number.and_then(|n| n.checked_mul(10)?.checked_add(u64::from(b - b'0')));
                    } else if matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') {
                        // Not a whole count (serde's `as_u64` would not read it either).
                        self.number = None;
                    } else {
                        self.end_number();
                        self.between(b);
                    }
                }
                Lex::Between => self.between(b),
            }
            bytes = rest;
        }
    }

    fn string_byte(&mut self, b: u8) {
        match b {
            b'\\' => self.escape = true,
            b'"' => {
                self.lex = Lex::Between;
                if self.str_use == StrUse::Model
                    && let Some(m) = self.model.take()
                {
                    let name = String::from_utf8_lossy(&m);
                    let mut end = name.len().min(MAX_MODEL_NAME);
                    while !name.is_char_boundary(end) {
                        end -= 1;
                    }
                    self.reported.model = Some(name[..end].to_string());
                }
            }
            _ => match self.str_use {
                StrUse::Key => {
                    if self.key_len < KEY_CAP {
                        self.key[self.key_len] = b;
                        self.key_len += 1;
                    } else {
                        self.key_len = KEY_CAP + 1;
                    }
                }
                StrUse::Model => self.model_byte(b),
                StrUse::Skip => {}
            },
        }
    }

    fn model_byte(&mut self, b: u8) {
        if let Some(m) = self.model.as_mut()
            && m.len() < MAX_MODEL_NAME + 4
        {
            m.push(b);
        }
    }

    fn between(&mut self, b: u8) {
        match b {
            b'"' => {
                self.lex = Lex::Str;
                self.escape = false;
                self.unicode_left = 0;
                let in_object = self.current().is_some_and(|(_, object)| object);
                self.str_use = if in_object && self.expect_key {
                    self.key_len = 0;
                    StrUse::Key
                } else if self.wants_model() {
                    self.model = Some(Vec::new());
                    StrUse::Model
                } else {
                    StrUse::Skip
                };
            }
            b':' => self.expect_key = false,
            b',' => {
                self.expect_key = true;
                self.key_len = KEY_CAP + 1;
            }
            b'{' | b'[' => self.open(b == b'{'),
            b'}' | b']' => self.close(),
            b'-' | b'0'..=b'9' => {
                self.lex = Lex::Num;
                self.number_for = match self.current() {
                    Some((Role::Usage, true)) if self.depth <= MAX_DEPTH => usage_key(self.last_key()),
                    _ => None,
                };
                self.number = (b != b'-').then(|| u64::from(b - b'0'));
            }
            _ => {}
        }
    }

    /// A string value here is the model name we keep: the first `model` of the body (or
    /// event), of its `message` or of its `response`.
    fn wants_model(&self) -> bool {
        self.reported.model.is_none()
            && self.last_key() == b"model"
            && matches!(self.current(), Some((Role::Top | Role::Message | Role::Response, true)))
    }

    fn open(&mut self, object: bool) {
        let role = match (self.current(), self.last_key()) {
            (None, _) => Role::Top,
            (Some((Role::Top, true)), b"message") => Role::Message,
            (Some((Role::Top, true)), b"response") => Role::Response,
            (Some((Role::Response, true)), b"message") => Role::Message,
            (Some((Role::Top | Role::Message | Role::Response, true)), b"usage") if object => Role::Usage,
            _ => Role::Other,
        };
        if role == Role::Usage {
            self.usage = UsageFields::default();
            self.usage_role = self.current().map_or(Role::Other, |(r, _)| r);
        }
        if self.depth < MAX_DEPTH {
            self.stack[self.depth] = (role, object);
        }
        self.depth = self.depth.saturating_add(1);
        self.expect_key = object;
        self.key_len = KEY_CAP + 1;
    }

    fn close(&mut self) {
        if self.depth == 0 {
            return;
        }
        if let Some((Role::Usage, _)) = self.current() {
            self.absorb_usage();
        }
        self.depth -= 1;
        self.expect_key = false;
        self.key_len = KEY_CAP + 1;
    }

    fn end_number(&mut self) {
        self.lex = Lex::Between;
        let (Some(n), Some(field)) = (self.number.take(), self.number_for.take()) else { return };
        let u = &mut self.usage;
        match field {
            UsageKey::Prompt => u.prompt_tokens = Some(n),
            UsageKey::Input => u.input_tokens = Some(n),
            UsageKey::Completion => u.completion_tokens = Some(n),
            UsageKey::Output => u.output_tokens = Some(n),
            UsageKey::Cached => u.cached = u.cached.saturating_add(n),
        }
    }

    /// A `usage` object closed: later values replace earlier ones (Anthropic's
    /// `message_delta` carries the cumulative output count).
    fn absorb_usage(&mut self) {
        let u = self.usage;
        let r = &mut self.reported;
        let prompt = u.prompt_tokens.or(u.input_tokens);
        let completion = u.completion_tokens.or(u.output_tokens);
        if let Some(p) = prompt {
            r.prompt_tokens = p.saturating_add(u.cached);
        }
        if let Some(c) = completion {
            r.completion_tokens = c;
        }
        if prompt.is_some() || completion.is_some() {
            r.found = true;
            r.last = self.usage_role != Role::Message;
        }
    }

    /// The value ends (an event's end): whatever was open is dropped, what was read stays.
    fn end_value(&mut self) {
        if self.lex == Lex::Num {
            self.end_number();
        }
        let reported = std::mem::take(&mut self.reported);
        *self = JsonUsage { reported, ..JsonUsage::default() };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    EventStream,
    /// No content type: the first byte tells (`{` or `[` is JSON, anything else an
    /// event stream).
    Sniff,
    /// Audio, images, files: no usage to read.
    Other,
}

/// Where an event stream's reader is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// The first bytes, until they tell whether this is a `data:` line.
    Start,
    /// A `data:` line: its value goes to the event's JSON reader; `space` while a single
    /// leading space after the colon may still have to be dropped.
    Data { space: bool },
    /// Any other line (`event:`, `id:`, a comment).
    Ignore,
}

/// Incremental usage reader for one response body, in constant memory.
#[derive(Debug, Clone)]
pub struct UsageParser {
    kind: Kind,
    json: JsonUsage,
    /// Event streams: the current line.
    line: Line,
    /// The first bytes of the current line while `line` is `Start`.
    head: [u8; 5],
    head_len: usize,
    /// The current event has had a data line (the next one is joined with a newline).
    event_data: bool,
    /// The last chunk ended with `\r`: a `\n` starting the next one ends no other line.
    after_cr: bool,
    /// Bytes of a leading byte-order mark matched so far (`BOM.len()` once past it).
    bom: usize,
}

/// What a `content-type` says a body is, as far as metering cares; matched in any case
/// and without allocating (it is read for every metered response and budgeted Check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    EventStream,
    /// No content type: the body itself tells.
    Unsaid,
    /// Audio, images, files, forms: no JSON text in it.
    Other,
}

impl BodyKind {
    pub fn of(content_type: &str) -> BodyKind {
        let has = |needle: &str| {
            content_type.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
        };
        if has("text/event-stream") {
            BodyKind::EventStream
        } else if content_type.trim().is_empty() {
            BodyKind::Unsaid
        } else if has("json") {
            BodyKind::Json
        } else {
            BodyKind::Other
        }
    }
}

/// UTF-8's byte-order mark, which an event stream may start with.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl UsageParser {
    /// `content_type` is the response's `content-type` header (empty when unknown).
    pub fn new(content_type: &str) -> Self {
        let kind = match BodyKind::of(content_type) {
            BodyKind::Json => Kind::Json,
            BodyKind::EventStream => Kind::EventStream,
            BodyKind::Unsaid => Kind::Sniff,
            BodyKind::Other => Kind::Other,
        };
        UsageParser {
            kind,
            json: JsonUsage::default(),
            line: Line::Start,
            head: [0; 5],
            head_len: 0,
            event_data: false,
            after_cr: false,
            bom: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.kind == Kind::Sniff {
            let Some(first) = chunk.iter().find(|b| !b.is_ascii_whitespace()) else { return };
            self.kind = if matches!(first, b'{' | b'[') { Kind::Json } else { Kind::EventStream };
        }
        match self.kind {
            Kind::Other | Kind::Sniff => {}
            Kind::Json => self.json.feed(chunk),
            Kind::EventStream => self.feed_events(chunk),
        }
    }

    /// Lines end with `\n`, `\r\n` or a lone `\r` (the SSE grammar); a byte-order mark at
    /// the start is skipped.
    fn feed_events(&mut self, mut chunk: &[u8]) {
        while self.bom < BOM.len() {
            let Some((&b, rest)) = chunk.split_first() else { return };
            if b == BOM[self.bom] {
                self.bom += 1;
                chunk = rest;
            } else {
                // Not a byte-order mark after all: what matched of it is text.
                let matched = self.bom;
                self.bom = BOM.len();
                self.feed_events(&BOM[..matched]);
            }
        }
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while !chunk.is_empty() {
            match memchr::memchr2(b'\n', b'\r', chunk) {
                Some(end) => {
                    self.line_bytes(&chunk[..end]);
                    self.end_line();
                    let cr = chunk[end] == b'\r';
                    chunk = &chunk[end + 1..];
                    if cr {
                        match chunk.first() {
                            Some(b'\n') => chunk = &chunk[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                }
                None => {
                    self.line_bytes(chunk);
                    chunk = &[];
                }
            }
        }
    }

    /// Bytes of the current line (no `\n` among them).
    fn line_bytes(&mut self, mut bytes: &[u8]) {
        if self.line == Line::Start {
            let n = (self.head.len() - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len < self.head.len() {
                return;
            }
            if &self.head == b"data:" {
                self.line = Line::Data { space: true };
                // Data lines of one event are joined with a newline.
                if std::mem::replace(&mut self.event_data, true) {
                    self.json.feed(b"\n");
                }
            } else {
                self.line = Line::Ignore;
            }
        }
        if let Line::Data { space } = self.line {
            if space && !bytes.is_empty() {
                bytes = bytes.strip_prefix(b" ").unwrap_or(bytes);
                self.line = Line::Data { space: false };
            }
            // A trailing `\r` is whitespace to the JSON reader.
            self.json.feed(bytes);
        }
    }

    fn end_line(&mut self) {
        if self.line == Line::Start {
            let head = &self.head[..self.head_len];
            if head.is_empty() || head == b"\r" {
                // A blank line ends the event.
                self.json.end_value();
                self.event_data = false;
            }
        }
        self.line = Line::Start;
        self.head_len = 0;
    }

    /// Call at the end of the body (or when the stream is cut).
    pub fn finish(mut self) -> Reported {
        if self.kind == Kind::EventStream {
            // A stream without a trailing blank line: its last event still counts.
            self.end_line();
        }
        self.json.end_value();
        std::mem::take(&mut self.json.reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"usage\" in text"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
    const ANTHROPIC_JSON: &str = r#"{"id":"msg_1","type":"message","model":"claude-3-5-haiku","content":[{"type":"text","text":"Hi"}],"usage":{"input_tokens":7,"output_tokens":9}}"#;
    const OPENAI_SSE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":5,\"total_tokens\":26}}\n\n\
data: [DONE]\n\n";
    const ANTHROPIC_SSE: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"claude-3-5-sonnet\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    fn parse_split(content_type: &str, body: &str, splits: &[usize]) -> Reported {
        let mut p = UsageParser::new(content_type);
        let mut last = 0;
        for &s in splits {
            p.feed(&body.as_bytes()[last..s]);
            last = s;
        }
        p.feed(&body.as_bytes()[last..]);
        p.finish()
    }

    fn check_every_split(content_type: &str, body: &str, want: &Reported) {
        assert_eq!(&parse_split(content_type, body, &[]), want, "whole body");
        for i in 0..=body.len() {
            assert_eq!(&parse_split(content_type, body, &[i]), want, "split at {i}");
        }
        // Byte by byte, and a few three-way splits.
        let every: Vec<usize> = (1..body.len()).collect();
        assert_eq!(&parse_split(content_type, body, &every), want, "byte by byte");
        for i in (0..body.len()).step_by(7) {
            for j in (i..body.len()).step_by(11) {
                assert_eq!(&parse_split(content_type, body, &[i, j]), want, "split at {i},{j}");
            }
        }
    }

    fn reported(model: &str, prompt: u64, completion: u64) -> Reported {
        Reported {
            model: Some(model.into()),
            prompt_tokens: prompt,
            completion_tokens: completion,
            found: true,
            last: true,
        }
    }

    #[test]
    fn openai_json_at_every_split() {
        check_every_split("application/json", OPENAI_JSON, &reported("gpt-4o-mini-2024-07-18", 12, 30));
    }

    #[test]
    fn anthropic_json_at_every_split() {
        check_every_split("application/json; charset=utf-8", ANTHROPIC_JSON, &reported("claude-3-5-haiku", 7, 9));
    }

    #[test]
    fn openai_stream_final_usage_chunk_at_every_split() {
        check_every_split("text/event-stream", OPENAI_SSE, &reported("gpt-4o-mini", 21, 5));
    }

    #[test]
    fn anthropic_stream_message_start_and_delta_at_every_split() {
        check_every_split("text/event-stream; charset=utf-8", ANTHROPIC_SSE, &reported("claude-3-5-sonnet", 25, 15));
    }

    #[test]
    fn anthropic_cache_tokens_count_as_prompt() {
        let body = r#"{"model":"claude","usage":{"input_tokens":10,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":5}}"#;
        assert_eq!(parse_split("application/json", body, &[20]), reported("claude", 1110, 5));
    }

    #[test]
    fn openai_responses_api_stream() {
        let body = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":null}}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":8,\"output_tokens\":3}}}\n\n";
        check_every_split("text/event-stream", body, &reported("gpt-4.1", 8, 3));
    }

    #[test]
    fn other_content_types_are_not_read() {
        let mut p = UsageParser::new("audio/mpeg");
        p.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert!(!p.finish().found);
        // No content type at all: read as JSON.
        assert!(parse_split("", r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#, &[]).found);
    }

    #[test]
    fn model_names_are_kept_bounded_on_a_character_boundary() {
        let long = format!("gpt-4o-mini-{}", "é".repeat(400));
        let body = format!(r#"{{"model":"{long}","usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#);
        let model = parse_split("application/json", &body, &[]).model.unwrap();
        assert!(model.len() <= MAX_MODEL_NAME && model.len() >= MAX_MODEL_NAME - 1, "{}", model.len());
        assert!(long.starts_with(&model), "a prefix, so dated names still find their price");
    }

    #[test]
    fn no_usage_found() {
        let r = parse_split("application/json", r#"{"error":{"message":"bad"}}"#, &[]);
        assert!(!r.found);
        let cut = &OPENAI_SSE[..OPENAI_SSE.find("\"usage\":{").unwrap()];
        let r = parse_split("text/event-stream", cut, &[10]);
        assert!(!r.found, "a cut stream reports no usage");
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
        assert!(!parse_split("application/json", "not json", &[3]).found);
    }

    #[test]
    fn stream_without_trailing_blank_line_still_counts() {
        let body = "data: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
        assert_eq!(parse_split("text/event-stream", body, &[5]), reported("m", 1, 2));
    }

    #[test]
    fn memory_is_constant_whatever_the_body() {
        // A 64 MB JSON body with its usage at the end, and an event of `data:` lines
        // that never ends, then a usage event: both read, in the parser's fixed size.
        let mut p = UsageParser::new("application/json");
        p.feed(br#"{"model":"m","choices":[{"message":{"content":""#);
        let filler = vec![b'x'; 1024 * 1024];
        for _ in 0..64 {
            p.feed(&filler);
        }
        p.feed(br#""}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(p.finish(), reported("m", 3, 4));

        let line = format!("data: {}\n", "x".repeat(64 * 1024 - 7));
        let chunk = line.repeat(16);
        let mut p = UsageParser::new("text/event-stream");
        p.feed(b"data: {\"model\":\"m\",");
        for _ in 0..200 {
            p.feed(chunk.as_bytes());
        }
        p.feed(b"\n\ndata: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n");
        assert_eq!(p.finish(), reported("m", 3, 4));
        // Nothing on the heap but the model name while it is read.
        assert!(std::mem::size_of::<UsageParser>() < 512, "{}", std::mem::size_of::<UsageParser>());
    }

    #[test]
    fn usage_inside_strings_and_deep_objects_is_not_usage() {
        let body = r#"{"model":"m","choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":999}","usage":{"prompt_tokens":5}}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":7}}}"#;
        check_every_split("application/json", body, &reported("m", 1, 2));
        // Counts that are not whole numbers are not counts.
        let r = parse_split("application/json", r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":-2}}"#, &[]);
        assert!(!r.found);
        let r = parse_split("application/json", r#"{"usage":{"completion_tokens":99999999999999999999999}}"#, &[]);
        assert!(!r.found, "beyond u64");
    }

    #[test]
    fn usage_from_message_start_alone_is_not_the_last_word() {
        let start = ANTHROPIC_SSE.split("event: message_delta").next().unwrap();
        let r = parse_split("text/event-stream", start, &[]);
        assert_eq!((r.found, r.last, r.prompt_tokens, r.completion_tokens), (true, false, 25, 1));
        // An error event instead of message_delta changes nothing.
        let errored = format!(
            "{start}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\"}}}}\n\n"
        );
        assert!(!parse_split("text/event-stream", &errored, &[]).last);
        assert!(parse_split("text/event-stream", ANTHROPIC_SSE, &[]).last);
        assert!(parse_split("application/json", OPENAI_JSON, &[]).last);
    }

    #[test]
    fn escapes_in_the_model_name_are_decoded() {
        let body = r#"{"model":"a\"b\nc\u00e9\/d","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        check_every_split("application/json", body, &reported("a\"b\ncé/d", 1, 2));
    }

    #[test]
    fn carriage_returns_alone_end_lines_and_a_byte_order_mark_is_skipped() {
        let cr = OPENAI_SSE.replace('\n', "\r");
        check_every_split("text/event-stream", &cr, &reported("gpt-4o-mini", 21, 5));
        let crlf = OPENAI_SSE.replace('\n', "\r\n");
        check_every_split("text/event-stream", &crlf, &reported("gpt-4o-mini", 21, 5));
        let bom = format!("\u{feff}{OPENAI_SSE}");
        check_every_split("text/event-stream", &bom, &reported("gpt-4o-mini", 21, 5));
    }

    #[test]
    fn content_types_are_read_in_any_case() {
        assert_eq!(BodyKind::of("Application/JSON; charset=utf-8"), BodyKind::Json);
        assert_eq!(BodyKind::of("TEXT/Event-Stream"), BodyKind::EventStream);
        assert_eq!(BodyKind::of("  "), BodyKind::Unsaid);
        assert_eq!(BodyKind::of("multipart/form-data; boundary=x"), BodyKind::Other);
    }

    #[test]
    fn without_a_content_type_the_first_byte_tells() {
        assert_eq!(parse_split("", OPENAI_SSE, &[0, 1]), reported("gpt-4o-mini", 21, 5));
        assert_eq!(parse_split("", &format!("\n {OPENAI_JSON}"), &[1]), reported("gpt-4o-mini-2024-07-18", 12, 30));
    }
}
