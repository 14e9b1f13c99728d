//! Reads what a response says it used: `usage` from JSON bodies and from
//! `text/event-stream` bodies (OpenAI's final usage chunk; Anthropic's
//! `message_start` / `message_delta`), with chunk boundaries anywhere.

use serde_json::Value;

/// A JSON body larger than this is not buffered for metering (it still counts as a request).
pub const MAX_JSON_BODY: usize = 16 * 1024 * 1024;
/// An SSE line longer than this is skipped.
pub const MAX_SSE_LINE: usize = 4 * 1024 * 1024;

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
                self.model = Some(m.to_string());
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    EventStream,
    /// Audio, images, files: no usage to read, nothing buffered.
    Other,
}

/// Incremental usage reader for one response body.
#[derive(Debug)]
pub struct UsageParser {
    kind: Kind,
    buf: Vec<u8>,
    /// SSE: `data:` lines of the event being read.
    event_data: Vec<u8>,
    /// Too large to read: JSON body over the cap, or the rest of an over-long SSE line.
    skipping: bool,
    reported: Reported,
}

impl UsageParser {
    /// `content_type` is the response's `content-type` header.
    pub fn new(content_type: &str) -> Self {
        let ct = content_type.to_ascii_lowercase();
        let kind = if ct.contains("text/event-stream") {
            Kind::EventStream
        } else if ct.is_empty() || ct.contains("json") {
            Kind::Json
        } else {
            Kind::Other
        };
        UsageParser { kind, buf: Vec::new(), event_data: Vec::new(), skipping: false, reported: Reported::default() }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        match self.kind {
            Kind::Other => {}
            Kind::Json => {
                if self.skipping || self.buf.len() + chunk.len() > MAX_JSON_BODY {
                    self.skipping = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            Kind::EventStream => {
                while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                    if !self.skipping {
                        self.buf.extend_from_slice(&chunk[..nl]);
                        let line = std::mem::take(&mut self.buf);
                        self.line(&line);
                    }
                    self.skipping = false;
                    self.buf.clear();
                    chunk = &chunk[nl + 1..];
                }
                if !self.skipping {
                    if self.buf.len() + chunk.len() > MAX_SSE_LINE {
                        self.skipping = true;
                        self.buf.clear();
                    } else {
                        self.buf.extend_from_slice(chunk);
                    }
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch();
        } else if let Some(data) = line.strip_prefix(b"data:") {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if !self.event_data.is_empty() {
                self.event_data.push(b'\n');
            }
            self.event_data.extend_from_slice(data);
        }
    }

    fn dispatch(&mut self) {
        let data = std::mem::take(&mut self.event_data);
        if data.is_empty() || data == b"[DONE]" {
            return;
        }
        // Only chunks that can carry usage or the model are worth parsing.
        let wanted = contains(&data, b"\"usage\"") || (self.reported.model.is_none() && contains(&data, b"\"model\""));
        if wanted && let Ok(v) = serde_json::from_slice::<Value>(&data) {
            self.reported.absorb(&v);
        }
    }

    /// Call at the end of the body (or when the stream is cut).
    pub fn finish(mut self) -> Reported {
        match self.kind {
            Kind::Other => {}
            Kind::Json => {
                if !self.skipping
                    && let Ok(v) = serde_json::from_slice::<Value>(&self.buf)
                {
                    self.reported.absorb(&v);
                }
            }
            Kind::EventStream => {
                if !self.skipping && !self.buf.is_empty() {
                    let line = std::mem::take(&mut self.buf);
                    self.line(&line);
                }
                self.dispatch();
            }
        }
        self.reported
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
        assert!(p.buf.is_empty());
        assert!(!p.finish().found);
        // No content type at all: read as JSON.
        assert!(parse_split("", r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#, &[]).found);
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
        assert!(p.buf.is_empty());
        assert!(!p.finish().found);
        let mut p = UsageParser::new("text/event-stream");
        p.feed(&vec![b'x'; MAX_SSE_LINE + 1]);
        p.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n");
        let r = p.finish();
        assert_eq!((r.prompt_tokens, r.completion_tokens), (3, 4), "reading resumes after the long line");
    }
}
