//! Reads what a response says it used: `usage` from JSON bodies and from
//! `text/event-stream` bodies (OpenAI's final usage chunk; Anthropic's
//! `message_start` / `message_delta`), with chunk boundaries anywhere.
//!
//! Memory is bounded per response and per process: a parser holds at most
//! [`MAX_JSON_BODY`] (JSON) or [`MAX_SSE_EVENT`] (event streams) bytes, and every
//! byte it holds is taken from one [`BufferBudget`] the whole process shares
//! ([`MAX_BUFFERED_TOTAL`]). A response that needs more is not read (its usage is
//! then not found); it still counts as a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// A JSON body larger than this is not buffered for metering (it still counts as a request).
pub const MAX_JSON_BODY: usize = 16 * 1024 * 1024;
/// An SSE event whose `data:` lines add up to more than this is dropped: the parser
/// skips to the event's end (the next blank line) and reads the events after it.
pub const MAX_SSE_EVENT: usize = 4 * 1024 * 1024;
/// What all the usage parsers of one process may hold together. A response that
/// would need more stops being read (its usage counts as not found).
pub const MAX_BUFFERED_TOTAL: usize = 64 * 1024 * 1024;
/// A response's model name is kept to this many bytes (prices name at most 200), so a
/// provider's odd value cannot grow logs or labels.
pub const MAX_MODEL_NAME: usize = 256;
/// A buffer at most this large is kept for the next event; a larger one is freed.
const KEEP_CAPACITY: usize = 64 * 1024;
/// The first allocation of a buffer.
const FIRST_CAPACITY: usize = 4 * 1024;

/// Usage a response reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reported {
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Whether any usage was found at all.
    pub found: bool,
}

impl Reported {
    /// Takes what one JSON object says; later values replace earlier ones
    /// (Anthropic's `message_delta` carries the cumulative output count).
    fn absorb(&mut self, v: &Value) {
        // OpenAI Responses API streams carry it under `response`.
        if let Some(r) = v.get("response").filter(|r| r.is_object()) {
            self.absorb(r);
        }
        let message = v.get("message");
        if self.model.is_none() {
            let model = v.get("model").or_else(|| message.and_then(|m| m.get("model")));
            if let Some(m) = model.and_then(Value::as_str) {
                let mut end = m.len().min(MAX_MODEL_NAME);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                self.model = Some(m[..end].to_string());
            }
        }
        let usage = v.get("usage").filter(|u| u.is_object()).or_else(|| message.and_then(|m| m.get("usage")));
        let Some(usage) = usage.filter(|u| u.is_object()) else { return };
        let field = |a: &str, b: &str| usage.get(a).or_else(|| usage.get(b)).and_then(Value::as_u64);
        if let Some(p) = field("prompt_tokens", "input_tokens") {
            // Anthropic reports prompt-cache tokens beside input_tokens; they are prompt too.
            let cached = ["cache_creation_input_tokens", "cache_read_input_tokens"]
                .iter()
                .filter_map(|k| usage.get(*k).and_then(Value::as_u64))
                .sum::<u64>();
            self.prompt_tokens = p.saturating_add(cached);
            self.found = true;
        }
        if let Some(c) = field("completion_tokens", "output_tokens") {
            self.completion_tokens = c;
            self.found = true;
        }
    }
}

/// The bytes all usage parsers of a process may hold: shared, lock-free. A parser
/// takes from it before its buffer grows and gives back when it frees or ends.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    used: AtomicUsize,
    /// The most ever held at once, to show the bound holds.
    peak: AtomicUsize,
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget::new(MAX_BUFFERED_TOTAL)
    }
}

impl BufferBudget {
    pub fn new(limit: usize) -> Self {
        BufferBudget { limit, used: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    /// Takes `n` bytes if they fit under the limit.
    fn take(&self, n: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|&t| t <= self.limit));
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes held now by all parsers.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most held at once since the process started.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    EventStream,
    /// Audio, images, files: no usage to read, nothing buffered.
    Other,
}

/// Where an event stream's reader is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// The first bytes, until they tell whether this is a `data:` line.
    Start,
    /// A `data:` line: its value goes to the event's data; `space` while a single
    /// leading space after the colon may still have to be dropped.
    Data { space: bool },
    /// Any other line (`event:`, `id:`, a comment), or a data line of an event being skipped.
    Ignore,
}

/// Why a parser stopped reading before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A JSON body over [`MAX_JSON_BODY`].
    TooLarge,
    /// The process's [`BufferBudget`] had no room.
    Starved,
}

enum Grow {
    Ok,
    OverCap,
    Starved,
}

/// Incremental usage reader for one response body.
#[derive(Debug)]
pub struct UsageParser {
    kind: Kind,
    /// JSON: the body so far. Event streams: the `data:` of the event being read.
    buf: Vec<u8>,
    /// Bytes of `buf`'s capacity taken from `budget`.
    charged: usize,
    budget: Option<Arc<BufferBudget>>,
    stopped: Option<Stop>,
    /// Event streams: the current line.
    line: Line,
    /// The first bytes of the current line while `line` is `Start`.
    head: [u8; 5],
    head_len: usize,
    /// Bytes the current data line put into `buf` (to drop a trailing `\r`).
    line_data: usize,
    /// The current event's data outgrew [`MAX_SSE_EVENT`]: skip to its end.
    skip_event: bool,
    reported: Reported,
}

impl UsageParser {
    /// `content_type` is the response's `content-type` header. Holds at most the
    /// per-response caps, with no process-wide budget (tools and tests).
    pub fn new(content_type: &str) -> Self {
        let ct = content_type.to_ascii_lowercase();
        let kind = if ct.contains("text/event-stream") {
            Kind::EventStream
        } else if ct.is_empty() || ct.contains("json") {
            Kind::Json
        } else {
            Kind::Other
        };
        UsageParser {
            kind,
            buf: Vec::new(),
            charged: 0,
            budget: None,
            stopped: None,
            line: Line::Start,
            head: [0; 5],
            head_len: 0,
            line_data: 0,
            skip_event: false,
            reported: Reported::default(),
        }
    }

    /// Like [`UsageParser::new`], taking every byte it buffers from `budget`.
    pub fn with_budget(content_type: &str, budget: Arc<BufferBudget>) -> Self {
        let mut p = Self::new(content_type);
        p.budget = Some(budget);
        p
    }

    /// Bytes this parser holds now (the capacity of its buffer).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether the process's budget refused this response buffer space (its usage
    /// will then not be found).
    pub fn starved(&self) -> bool {
        self.stopped == Some(Stop::Starved)
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.stopped.is_some() {
            return;
        }
        match self.kind {
            Kind::Other => {}
            Kind::Json => match self.grow(chunk.len(), MAX_JSON_BODY) {
                Grow::Ok => self.buf.extend_from_slice(chunk),
                Grow::OverCap => self.stop(Stop::TooLarge),
                Grow::Starved => self.stop(Stop::Starved),
            },
            Kind::EventStream => self.feed_events(chunk),
        }
    }

    fn feed_events(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && self.stopped.is_none() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.line_bytes(&chunk[..nl]);
                    self.end_line();
                    chunk = &chunk[nl + 1..];
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
            if &self.head == b"data:" && !self.skip_event {
                self.line = Line::Data { space: true };
                self.line_data = 0;
                // Data lines of one event are joined with a newline.
                if !self.buf.is_empty() {
                    self.append(b"\n");
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
            self.line_data += bytes.len();
            self.append(bytes);
        }
    }

    /// Adds to the event's data, or drops the event once it is over the cap.
    fn append(&mut self, bytes: &[u8]) {
        if self.line == Line::Ignore || self.stopped.is_some() {
            return;
        }
        match self.grow(bytes.len(), MAX_SSE_EVENT) {
            Grow::Ok => self.buf.extend_from_slice(bytes),
            Grow::OverCap => {
                self.skip_event = true;
                self.line = Line::Ignore;
                self.release();
            }
            Grow::Starved => self.stop(Stop::Starved),
        }
    }

    fn end_line(&mut self) {
        match self.line {
            Line::Start => {
                let head = &self.head[..self.head_len];
                if head.is_empty() || head == b"\r" {
                    self.dispatch();
                }
            }
            Line::Data { .. } => {
                if self.line_data > 0 && self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
            }
            Line::Ignore => {}
        }
        self.line = Line::Start;
        self.head_len = 0;
    }

    /// The event ends (a blank line): read its data if it can carry usage.
    fn dispatch(&mut self) {
        let skipped = std::mem::replace(&mut self.skip_event, false);
        let data = &self.buf[..];
        if !skipped && !data.is_empty() && data != b"[DONE]" {
            // Only chunks that can carry usage or the model are worth parsing.
            let wanted =
                contains(data, b"\"usage\"") || (self.reported.model.is_none() && contains(data, b"\"model\""));
            if wanted && let Ok(v) = serde_json::from_slice::<Value>(data) {
                self.reported.absorb(&v);
            }
        }
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY {
            self.release();
        }
    }

    /// Makes room for `extra` more bytes in `buf`, within `cap` and the process budget.
    /// Capacity grows by doubling, so a body fed in small chunks is copied O(n) times.
    fn grow(&mut self, extra: usize, cap: usize) -> Grow {
        let need = self.buf.len().saturating_add(extra);
        if need > cap {
            return Grow::OverCap;
        }
        if need <= self.buf.capacity() {
            return Grow::Ok;
        }
        let mut target = need.max(self.buf.capacity().saturating_mul(2)).max(FIRST_CAPACITY).min(cap);
        if let Some(budget) = &self.budget
            && !budget.take(target - self.charged)
        {
            // No room to double: exactly what is needed, or nothing.
            if !budget.take(need - self.charged) {
                return Grow::Starved;
            }
            target = need;
        }
        self.buf.reserve_exact(target - self.buf.len());
        // `reserve_exact` may round up; whatever it holds is charged.
        let extra_rounding = self.buf.capacity().saturating_sub(target);
        if let Some(budget) = &self.budget
            && extra_rounding > 0
        {
            budget.used.fetch_add(extra_rounding, Ordering::AcqRel);
        }
        self.charged = self.buf.capacity();
        Grow::Ok
    }

    /// Frees the buffer and gives its bytes back.
    fn release(&mut self) {
        self.buf = Vec::new();
        if let Some(budget) = &self.budget {
            budget.give_back(self.charged);
        }
        self.charged = 0;
    }

    fn stop(&mut self, why: Stop) {
        self.stopped = Some(why);
        self.release();
    }

    /// Call at the end of the body (or when the stream is cut).
    pub fn finish(mut self) -> Reported {
        if self.starved() {
            // What was read before may be a part (Anthropic's first input count, not the
            // final output): report nothing rather than too little.
            let model = self.reported.model.take();
            return Reported { model, ..Reported::default() };
        }
        match self.kind {
            Kind::Other => {}
            Kind::Json => {
                if self.stopped.is_none()
                    && let Ok(v) = serde_json::from_slice::<Value>(&self.buf)
                {
                    self.reported.absorb(&v);
                }
            }
            Kind::EventStream => {
                if self.stopped.is_none() {
                    // A stream without a trailing blank line: its last event still counts.
                    self.end_line();
                    self.dispatch();
                }
            }
        }
        std::mem::take(&mut self.reported)
    }
}

impl Drop for UsageParser {
    fn drop(&mut self) {
        self.release();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
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
        Reported { model: Some(model.into()), prompt_tokens: prompt, completion_tokens: completion, found: true }
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
    fn other_content_types_are_not_buffered() {
        let mut p = UsageParser::new("audio/mpeg");
        p.feed(&[0u8; 1024]);
        assert_eq!(p.held(), 0);
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
    fn oversized_bodies_are_skipped_not_buffered() {
        let mut p = UsageParser::new("application/json");
        p.feed(&vec![b' '; MAX_JSON_BODY]);
        p.feed(b"{}");
        assert_eq!(p.held(), 0);
        assert!(!p.finish().found);
        // A long line that is not `data:` is never buffered.
        let mut p = UsageParser::new("text/event-stream");
        p.feed(&vec![b'x'; MAX_SSE_EVENT + 1]);
        assert_eq!(p.held(), 0);
        p.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n");
        let r = p.finish();
        assert_eq!((r.prompt_tokens, r.completion_tokens), (3, 4), "reading resumes after the long line");
    }

    #[test]
    fn a_200_mb_event_of_data_lines_never_holds_more_than_the_event_cap() {
        // `data:` lines with no blank line between them: one event that never ends.
        let line = format!("data: {}\n", "x".repeat(64 * 1024 - 7));
        let chunk = line.repeat(4);
        let budget = Arc::new(BufferBudget::default());
        let mut p = UsageParser::with_budget("text/event-stream", Arc::clone(&budget));
        p.feed(b"data: {\"model\":\"m\",");
        let mut fed = 0;
        while fed < 200 * 1024 * 1024 {
            p.feed(chunk.as_bytes());
            fed += chunk.len();
            assert!(p.held() <= MAX_SSE_EVENT, "holds {} bytes after {fed}", p.held());
            assert_eq!(budget.used(), p.held());
        }
        // The event ends; the one after it is read as usual.
        p.feed(b"\n\ndata: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n");
        assert!(budget.peak() <= MAX_SSE_EVENT);
        assert_eq!(p.finish(), reported("m", 3, 4));
        assert_eq!(budget.used(), 0, "every byte was given back");
    }

    #[test]
    fn an_event_over_the_cap_is_dropped_whatever_the_split() {
        let big = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":9}},\"pad\":\"{}\"}}\n",
            "y".repeat(MAX_SSE_EVENT)
        );
        let body = format!(
            "{big}\r\ndata: {{\"model\":\"m\",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}\r\n\r\n"
        );
        for split in [1, 6, 7, 1000, big.len() - 1, big.len() + 1] {
            assert_eq!(parse_split("text/event-stream", &body, &[split]), reported("m", 1, 2), "split at {split}");
        }
    }

    #[test]
    fn the_process_budget_bounds_what_concurrent_responses_hold() {
        let budget = Arc::new(BufferBudget::new(256 * 1024));
        let usage = br#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let mut a = UsageParser::with_budget("application/json", Arc::clone(&budget));
        let mut b = UsageParser::with_budget("application/json", Arc::clone(&budget));
        let mut c = UsageParser::with_budget("text/event-stream", Arc::clone(&budget));
        a.feed(&[b' '; 150 * 1024]);
        a.feed(usage);
        b.feed(&[b' '; 150 * 1024]);
        assert!(b.starved() && b.held() == 0, "no room left for a second large body");
        c.feed(b"data: ");
        c.feed(&[b' '; 150 * 1024]);
        assert!(c.starved());
        c.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n");
        assert!(budget.used() <= budget.limit());
        assert_eq!(budget.used(), a.held());
        assert!(!b.finish().found, "a starved response reports no usage");
        assert!(!c.finish().found, "a starved stream stops reading");
        // Usage read before the budget ran out is only part of it: none is reported.
        let mut e = UsageParser::with_budget("text/event-stream", Arc::clone(&budget));
        e.feed(ANTHROPIC_SSE.split("event: content_block_delta").next().unwrap().as_bytes());
        e.feed(b"event: content_block_delta\ndata: ");
        e.feed(&[b' '; 200 * 1024]);
        assert!(e.starved());
        let r = e.finish();
        assert_eq!((r.found, r.prompt_tokens, r.model.as_deref()), (false, 0, Some("claude-3-5-sonnet")));
        assert_eq!(a.finish(), reported("m", 1, 2));
        assert_eq!(budget.used(), 0);
        // Room again once they are done.
        let mut d = UsageParser::with_budget("application/json", Arc::clone(&budget));
        d.feed(&[b' '; 150 * 1024]);
        d.feed(usage);
        assert!(!d.starved());
        drop(d);
        assert_eq!(budget.used(), 0, "dropping a parser gives its bytes back");
    }

    #[test]
    fn large_event_buffers_are_freed_once_the_event_is_read() {
        let budget = Arc::new(BufferBudget::default());
        let mut p = UsageParser::with_budget("text/event-stream", Arc::clone(&budget));
        p.feed(format!("data: \"{}\"\n", "z".repeat(KEEP_CAPACITY * 2)).as_bytes());
        assert!(p.held() > KEEP_CAPACITY);
        p.feed(b"\n");
        assert_eq!((p.held(), budget.used()), (0, 0));
        p.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n");
        assert!(p.held() <= KEEP_CAPACITY, "a small buffer is kept for the next event");
        assert_eq!(budget.used(), p.held());
    }
}
