//! What a successful response that reports no usage is charged: an estimate from the
//! generated content that went through the meter, never less than its reservation.
//!
//! The estimate counts the bytes of JSON string values under content-bearing keys
//! (`content`, `text`, `delta`, `arguments`, ...) in JSON and `text/event-stream` bodies,
//! with a cheap lexical scan (no JSON parse per event), escapes decoded to the bytes they
//! stand for, chunk boundaries anywhere, in O(1) memory. One token is charged per
//! `BYTES_PER_TOKEN` bytes, rounded up: about what common tokenizers give for English
//! text. It is a floor against free responses, not a bill: providers that report usage
//! are charged what they report.

use super::budget::{Hold, Metered};
use super::pricing::{Price, cost_micros};
use super::usage::{BodyKind, Reported};

/// The estimate's ratio: one completion token per this many bytes of content, rounded up.
pub const BYTES_PER_TOKEN: u64 = 4;

/// Keys whose string values are generated content (OpenAI chat and Responses, Anthropic
/// messages, tool-call arguments, reasoning).
const CONTENT_KEYS: &[&[u8]] = &[
    b"content",
    b"text",
    b"delta",
    b"arguments",
    b"reasoning_content",
    b"reasoning",
    b"refusal",
    b"partial_json",
    b"thinking",
];
/// Keys whose string values in a request are not prompt text: the model's name, and
/// binary payloads (data URLs, base64 images, audio and files). Every other string value
/// of a request counts as prompt, however its key is written (escaped, unknown, in tools
/// or schemas, in arrays).
const NOT_TEXT_KEYS: &[&[u8]] =
    &[b"model", b"url", b"image_url", b"data", b"b64_json", b"file_data", b"audio", b"image"];
/// The longest key we match: longer strings are never one of them.
const KEY_CAP: usize = 17;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A response: string values under `CONTENT_KEYS`.
    Content,
    /// A request: every string value except the direct values of `NOT_TEXT_KEYS`.
    Prompt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Outside,
    /// Inside a string that may be a key (its first `key_len` bytes are in `key`).
    Key,
    /// Inside a string value under a content key: its bytes are counted.
    Value,
    /// After a string closed; `last_was_content_key` says whether it names content.
    AfterString,
    /// After `"content-key":`, waiting for the value.
    BeforeValue,
}

/// Tokens for `bytes` of text: one per `BYTES_PER_TOKEN`, rounded up.
pub fn tokens(bytes: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Counts content bytes of one response body, fed chunk by chunk.
#[derive(Debug, Clone)]
pub struct ContentEstimate {
    active: bool,
    mode: Mode,
    state: State,
    /// Inside a string, after a backslash.
    escape: bool,
    /// Inside `\uXXXX`: hex digits still to read (0 when not in one) and the code unit so far.
    unicode_left: u8,
    unicode: u16,
    key: [u8; KEY_CAP],
    /// Bytes of the current key-candidate string; `KEY_CAP + 1` once it cannot be a content key.
    key_len: usize,
    /// Content mode: the last key names content. Prompt mode: it names a binary payload.
    last_key_matched: bool,
    /// Prompt mode: bytes of the string just read, counted once it proves to be a value.
    pending: u64,
    /// Prompt mode: the string being read is a binary payload.
    skip: bool,
    bytes: u64,
}

impl ContentEstimate {
    /// For a response with this `content-type`: JSON and event streams are scanned; other
    /// bodies (audio, images, files) count nothing.
    pub fn new(content_type: &str) -> Self {
        let active = BodyKind::of(content_type) != BodyKind::Other;
        ContentEstimate { active, mode: Mode::Content, ..Self::request() }
    }

    /// For a JSON request body: the bytes of its prompt text, which is every string value
    /// but binary payloads (`NOT_TEXT_KEYS`).
    pub fn request() -> Self {
        ContentEstimate {
            active: true,
            mode: Mode::Prompt,
            state: State::Outside,
            escape: false,
            unicode_left: 0,
            unicode: 0,
            key: [0; KEY_CAP],
            key_len: 0,
            last_key_matched: false,
            pending: 0,
            skip: false,
            bytes: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.active {
            return;
        }
        let mut i = 0;
        while i < chunk.len() {
            let rest = &chunk[i..];
            // Runs that change nothing but counts are skipped or counted in one step: up
            // to the next quote between tokens; up to the next quote, backslash or line
            // break inside a string.
            let run = match self.state {
                State::Outside => memchr::memchr(b'"', rest).unwrap_or(rest.len()),
                State::Key | State::Value if !self.escape && self.unicode_left == 0 => {
                    let end = memchr::memchr3(b'"', b'\\', b'\n', rest).unwrap_or(rest.len());
                    memchr::memchr(b'\r', &rest[..end]).unwrap_or(end)
                }
                _ => 0,
            };
            if run > 0 {
                if self.state != State::Outside {
                    self.plain(&rest[..run]);
                }
                i += run;
                continue;
            }
            self.byte(chunk[i]);
            i += 1;
        }
    }

    /// Bytes inside a string that are neither a quote, a backslash nor a line break, as
    /// [`Self::byte`] would count them one by one.
    fn plain(&mut self, run: &[u8]) {
        self.add(run.len() as u64);
        if self.state == State::Key {
            match self.key_len.checked_add(run.len()).filter(|&end| end <= KEY_CAP) {
                Some(end) => {
                    self.key[self.key_len..end].copy_from_slice(run);
                    self.key_len = end;
                }
                None => self.key_len = KEY_CAP + 1,
            }
        }
    }

    /// Content bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The estimate in tokens: `bytes / BYTES_PER_TOKEN`, rounded up.
    pub fn tokens(&self) -> u64 {
        tokens(self.bytes)
    }

    fn byte(&mut self, b: u8) {
        match self.state {
            State::Key | State::Value => self.in_string(b),
            State::Outside => self.outside(b),
            State::AfterString => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                // The string was a key.
                b':' if self.mode == Mode::Prompt => {
                    self.pending = 0;
                    self.state = State::BeforeValue;
                }
                b':' if self.last_key_matched => self.state = State::BeforeValue,
                _ => {
                    // The string was a value (in an array, or cut short).
                    self.bytes = self.bytes.saturating_add(std::mem::take(&mut self.pending));
                    self.state = State::Outside;
                    self.outside(b);
                }
            },
            State::BeforeValue => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'"' => {
                    self.open(State::Value);
                    // A binary payload's bytes are no prompt.
                    self.skip = self.mode == Mode::Prompt && self.last_key_matched;
                }
                // An object, array, number, null: keys inside it are read as usual.
                _ => {
                    self.state = State::Outside;
                    self.outside(b);
                }
            },
        }
    }

    fn outside(&mut self, b: u8) {
        if b == b'"' {
            self.open(State::Key);
        }
    }

    fn open(&mut self, state: State) {
        self.state = state;
        self.escape = false;
        self.unicode_left = 0;
        self.key_len = 0;
        self.pending = 0;
    }

    /// `n` bytes of the string being read: counted now (a content value), held until it
    /// proves to be a value (prompt mode, a string not yet known to be a key or a value),
    /// or dropped (a key, a binary payload).
    fn add(&mut self, n: u64) {
        match self.state {
            State::Value if !self.skip => self.bytes = self.bytes.saturating_add(n),
            State::Key if self.mode == Mode::Prompt => self.pending = self.pending.saturating_add(n),
            _ => {}
        }
    }

    fn in_string(&mut self, b: u8) {
        let in_key = self.state == State::Key;
        if self.unicode_left > 0 {
            let Some(d) = (b as char).to_digit(16) else {
                // Not an escape after all: give up on this string's exact length.
                self.unicode_left = 0;
                return self.in_string(b);
            };
            self.unicode = (self.unicode << 4) | d as u16;
            self.unicode_left -= 1;
            if self.unicode_left == 0 {
                // The UTF-8 length of the code unit; a surrogate pair makes 4 bytes together.
                self.add(match self.unicode {
                    0..0x80 => 1,
                    0x80..0x800 => 2,
                    0xD800..0xE000 => 2,
                    _ => 3,
                });
            }
            return;
        }
        if self.escape {
            self.escape = false;
            if b == b'u' {
                self.unicode_left = 4;
                self.unicode = 0;
            } else {
                self.add(1);
            }
            if in_key {
                // The keys we match have no escapes.
                self.key_len = KEY_CAP + 1;
            }
            return;
        }
        match b {
            b'\\' => self.escape = true,
            b'"' => {
                let keys = match self.mode {
                    Mode::Content => CONTENT_KEYS,
                    Mode::Prompt => NOT_TEXT_KEYS,
                };
                self.last_key_matched =
                    in_key && self.key_len <= KEY_CAP && keys.iter().any(|k| *k == &self.key[..self.key_len]);
                self.skip = false;
                self.state = State::AfterString;
            }
            // A JSON string never holds a raw line break: what came before was not JSON
            // (an SSE comment, a cut event). Start over on the next line.
            b'\n' | b'\r' => {
                self.pending = 0;
                self.skip = false;
                self.state = State::Outside;
            }
            _ => {
                self.add(1);
                if in_key {
                    if self.key_len < KEY_CAP {
                        self.key[self.key_len] = b;
                        self.key_len += 1;
                    } else {
                        self.key_len = KEY_CAP + 1;
                    }
                }
            }
        }
    }
}

/// What a successful response whose usage is missing or incomplete (cut before its end,
/// or its final usage never came) is charged: what it reported (nothing, or part), its
/// prompt raised to the request's prompt estimate and its completion to the content
/// estimate, and never fewer tokens or micro-USD than its reservation `held`. Priced at
/// the response model's prices when it has them (`price`).
pub fn charge_unreported(
    reported: &Reported,
    estimate_tokens: u64,
    price: Option<&Price>,
    held: Option<Hold>,
) -> Metered {
    let held = held.unwrap_or_default();
    let (prompt, completion) =
        if reported.found { (reported.prompt_tokens, reported.completion_tokens) } else { (0, 0) };
    let prompt = prompt.max(held.prompt_tokens);
    let completion = completion.max(estimate_tokens);
    // The price is of what was estimated; the reservation's micro-USD are the floor of it.
    let priced = price.map_or(0, |p| cost_micros(p, prompt, completion));
    Metered {
        prompt_tokens: prompt,
        completion_tokens: completion.max(held.tokens.saturating_sub(prompt)),
        cost_micros: priced.max(held.micros).max(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs skipped or counted in one step give what reading byte by byte gives, for
    /// bodies made of the bytes the scanner cares about, in both modes.
    #[test]
    fn runs_count_as_bytes_one_by_one() {
        const PIECES: &[&str] = &[
            "\"content\"",
            "\"text\"",
            "\"model\"",
            "\"data\"",
            "\"reasoning_content_x\"",
            ":",
            "\"",
            "\\",
            "\\\"",
            "\\u00e9",
            "\\ud83d",
            "\\uzz",
            "\\n",
            "\n",
            "\r",
            "abc",
            " ",
            "{",
            "}",
            "[",
            "]",
            ",",
            "é",
            "data: ",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let pieces = next() % 40;
            let body: String = (0..pieces).map(|_| PIECES[(next() % PIECES.len() as u64) as usize]).collect();
            let body = body.as_bytes();
            for start in [ContentEstimate::new("application/json"), ContentEstimate::request()] {
                let (mut fast, mut slow) = (start.clone(), start);
                fast.feed(body);
                for &b in body {
                    slow.byte(b);
                }
                assert_eq!(fast.bytes, slow.bytes, "{:?}", String::from_utf8_lossy(body));
                assert_eq!((fast.state, fast.pending, fast.key_len), (slow.state, slow.pending, slow.key_len));
            }
        }
    }

    fn bytes_of(ct: &str, body: &[u8]) -> u64 {
        let mut e = ContentEstimate::new(ct);
        e.feed(body);
        e.bytes()
    }

    const OPENAI_JSON: &str = r#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the fake upstream."},"finish_reason":"stop"}],"usage":null}"#;

    const OPENAI_SSE: &str = concat!(
        "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
        ": keep-alive \"comment\n\n",
        "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" w\\u00f6rld\\n\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\n\n",
        "data: [DONE]\n\n",
    );

    const ANTHROPIC_SSE: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"content\":[]}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi there\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
    );

    #[test]
    fn counts_content_values_only() {
        assert_eq!(bytes_of("application/json", OPENAI_JSON.as_bytes()), 29);
        // "Hello" 5, " wörld\n" 1 + 1 + 2 + 3 + 1 = 8, arguments {"a":1} 7.
        assert_eq!(bytes_of("text/event-stream", OPENAI_SSE.as_bytes()), 5 + 8 + 7);
        // "Hi there" 8, "hmm" 3, "{}" 2; the "text" value of "type" is not a key.
        assert_eq!(bytes_of("text/event-stream; charset=utf-8", ANTHROPIC_SSE.as_bytes()), 13);
        // Keys and values that are not content count nothing.
        assert_eq!(bytes_of("application/json", br#"{"model":"content","role":"text","contents":"xx"}"#), 0);
        assert_eq!(bytes_of("image/png", OPENAI_JSON.as_bytes()), 0);
        assert_eq!(bytes_of("", br#"{"text" :  "abcd"}"#), 4);
        // An OpenAI Responses stream: `delta` is a string there.
        assert_eq!(
            bytes_of("text/event-stream", b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"abc\"}\n\n"),
            3
        );
        // A surrogate pair is one 4-byte character.
        assert_eq!(bytes_of("", br#"{"content":"\ud83d\ude00"}"#), 4);
    }

    #[test]
    fn any_split_gives_the_same_count() {
        for body in [OPENAI_JSON, OPENAI_SSE, ANTHROPIC_SSE] {
            let whole = bytes_of("text/event-stream", body.as_bytes());
            let b = body.as_bytes();
            for i in 0..=b.len() {
                for j in i..=b.len() {
                    let mut e = ContentEstimate::new("text/event-stream");
                    e.feed(&b[..i]);
                    e.feed(&b[i..j]);
                    e.feed(&b[j..]);
                    assert_eq!(e.bytes(), whole, "split at {i}, {j}");
                }
            }
        }
    }

    #[test]
    fn byte_by_byte_matches_and_memory_is_constant() {
        let mut e = ContentEstimate::new("application/json");
        let mut big = br#"{"content":""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', 1_000_001));
        big.extend_from_slice(br#""}"#);
        for b in big.chunks(7) {
            e.feed(b);
        }
        assert_eq!((e.bytes(), e.tokens()), (1_000_001, 250_001), "rounded up");
        assert_eq!(std::mem::size_of::<ContentEstimate>(), std::mem::size_of_val(&e));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let alphabet = b"{}[]:,\"\\u0123456789abcdefxtn \n\rcontent";
        for _ in 0..200 {
            let mut e = ContentEstimate::new("");
            for _ in 0..500 {
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                let b = alphabet[(rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % alphabet.len() as u64) as usize];
                e.feed(&[b]);
            }
            assert!(e.bytes() <= 500);
        }
    }

    #[test]
    fn the_charge_is_the_estimate_never_less_than_the_reservation() {
        let price = Price { input_micros_per_million: 150_000, output_micros_per_million: 600_000 };
        let none = Reported::default();
        let held = |tokens, micros| Some(Hold { tokens, micros, prompt_tokens: 0 });
        // 10 tokens at $0.60 per million = 6 micro-USD.
        assert_eq!(
            charge_unreported(&none, 10, Some(&price), held(300, 2)),
            Metered { prompt_tokens: 0, completion_tokens: 300, cost_micros: 6 }
        );
        assert_eq!(
            charge_unreported(&none, 1000, Some(&price), held(4, 100)),
            Metered { prompt_tokens: 0, completion_tokens: 1000, cost_micros: 600 }
        );
        assert_eq!(
            charge_unreported(&none, 7, None, None),
            Metered { prompt_tokens: 0, completion_tokens: 7, cost_micros: 0 }
        );
        // Cut after Anthropic's message_start (1 output token so far): the prompt as
        // reported, the completion from the content, the reservation as the floor.
        let part = Reported { model: None, prompt_tokens: 1000, completion_tokens: 1, found: true, last: false };
        assert_eq!(
            charge_unreported(&part, 50, Some(&price), held(20, 0)),
            Metered { prompt_tokens: 1000, completion_tokens: 50, cost_micros: 150 + 30 }
        );
        assert_eq!(charge_unreported(&part, 0, None, held(2000, 0)).completion_tokens, 1000, "the rest of the hold");
        // The prompt estimate is the least charged for the prompt; the hold covers both.
        let asked = Some(Hold { tokens: 300, micros: 0, prompt_tokens: 120 });
        assert_eq!(
            charge_unreported(&none, 10, Some(&price), asked),
            Metered { prompt_tokens: 120, completion_tokens: 180, cost_micros: 18 + 6 }
        );
        let reported_more =
            Reported { model: None, prompt_tokens: 500, completion_tokens: 1, found: true, last: false };
        assert_eq!(charge_unreported(&reported_more, 0, None, asked).prompt_tokens, 500);
    }
}
