//! Incremental splitting of the client byte stream into JSON messages.
//!
//! QEMU's JSON streamer tokenises input and hands a message to the parser
//! once its braces and brackets balance. [`Splitter`] does the same with a
//! tiny state machine (string / escape / depth tracking) so that limits are
//! enforced *before* anything is allocated or given to `serde_json`:
//!
//! * a message longer than [`MAX_MESSAGE_SIZE`] bytes is refused as soon as
//!   the limit is crossed; the rest of it is skipped without being stored;
//! * a message nested deeper than [`MAX_NESTING`] is refused the same way,
//!   so `serde_json` never recurses deeply;
//! * a raw control character inside a string (e.g. the newline after an
//!   unterminated string) is a syntax error and resynchronises the stream
//!   at top level, as do the bytes `0xFE` and `0xFF` (which can never
//!   appear in UTF-8: clients may send them to reset the parser, as with
//!   QEMU).

use serde_json::Value;

/// Largest accepted message, in bytes.
pub const MAX_MESSAGE_SIZE: usize = 1024 * 1024;
/// Deepest accepted nesting of arrays and objects.
pub const MAX_NESTING: usize = 64;

/// One unit of client input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item {
    /// A complete, balanced message (not yet validated as JSON / UTF-8).
    Message(Vec<u8>),
    /// The input was refused; `desc` is the GenericError text.
    Error(String),
}

/// Byte-level message splitter; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Splitter {
    buf: Vec<u8>,
    /// Open `{`/`[` count of the current message.
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Inside a top-level scalar such as `123` or `true`.
    scalar: bool,
    /// The current message was already refused: track it, store nothing.
    discarding: bool,
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

impl Splitter {
    /// Creates an idle splitter.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Bytes currently buffered (for tests of the memory bound).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True while a message is partially received.
    fn in_message(&self) -> bool {
        self.depth > 0 || self.in_string || self.scalar
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.scalar = false;
        self.discarding = false;
    }

    /// Ends the current message, emitting it unless it was refused.
    fn finish(&mut self, out: &mut Vec<Item>) {
        if !self.discarding {
            out.push(Item::Message(std::mem::take(&mut self.buf)));
        }
        self.reset();
    }

    /// Refuses the current message and goes on tracking it without storage.
    fn refuse(&mut self, desc: &str, out: &mut Vec<Item>) {
        if !self.discarding {
            out.push(Item::Error(desc.to_string()));
            self.buf = Vec::new();
            self.discarding = true;
        }
    }

    fn store(&mut self, b: u8, out: &mut Vec<Item>) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE_SIZE {
            self.refuse("JSON token size limit exceeded", out);
            return;
        }
        self.buf.push(b);
    }

    /// Feeds bytes; complete messages and errors are appended to `out`.
    pub(crate) fn push(&mut self, data: &[u8], out: &mut Vec<Item>) {
        for &b in data {
            self.push_byte(b, out);
        }
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Item>) {
        if b >= 0xFE {
            // Never valid UTF-8: resets the parser like QEMU's lexer.
            if self.in_message() && !self.discarding {
                out.push(Item::Error(format!("JSON parse error, stray '\\x{b:02X}'")));
            }
            self.reset();
            return;
        }
        if self.in_string {
            self.string_byte(b, out);
        } else if self.scalar {
            if is_scalar_byte(b) {
                self.store(b, out);
            } else {
                self.finish(out);
                self.push_byte(b, out);
            }
        } else if self.depth == 0 {
            self.top_level_byte(b, out);
        } else {
            self.nested_byte(b, out);
        }
    }

    fn string_byte(&mut self, b: u8, out: &mut Vec<Item>) {
        if b < 0x20 {
            // Raw control characters are not allowed in JSON strings; this
            // is typically the line end after an unterminated string.
            if !self.discarding {
                out.push(Item::Error(
                    "JSON parse error, control character in string".to_string(),
                ));
            }
            self.reset();
            return;
        }
        self.store(b, out);
        if self.escape {
            self.escape = false;
        } else if b == b'\\' {
            self.escape = true;
        } else if b == b'"' {
            self.in_string = false;
            if self.depth == 0 {
                self.finish(out);
            }
        }
    }

    fn top_level_byte(&mut self, b: u8, out: &mut Vec<Item>) {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {}
            b'{' | b'[' => {
                self.depth = 1;
                self.store(b, out);
            }
            b'}' | b']' => {
                out.push(Item::Error(format!(
                    "JSON parse error, stray '{}'",
                    b as char
                )));
            }
            b'"' => {
                self.in_string = true;
                self.store(b, out);
            }
            _ if is_scalar_byte(b) => {
                self.scalar = true;
                self.store(b, out);
            }
            _ => {
                // Any other single byte is a complete (invalid) token.
                self.store(b, out);
                self.finish(out);
            }
        }
    }

    fn nested_byte(&mut self, b: u8, out: &mut Vec<Item>) {
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_NESTING {
                    self.refuse("JSON nesting depth limit exceeded", out);
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.store(b, out);
                    self.finish(out);
                    return;
                }
            }
            _ => {}
        }
        self.store(b, out);
    }
}

/// Validates a complete message as UTF-8 JSON. An object with a key twice is
/// refused at any depth, as QEMU does: otherwise the last one would silently win
/// (`{"execute": "query-status", "execute": "quit"}` would quit).
pub(crate) fn parse_message(bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "JSON parse error, invalid UTF-8 sequence in string".to_string())?;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed =
        serde::Deserializer::deserialize_any(&mut de, UniqueKeys).and_then(|v| de.end().map(|_| v));
    parsed.map_err(|e| format!("JSON parse error, {e}"))
}

/// Builds a [`Value`] like serde_json does, refusing duplicate object keys.
struct UniqueKeys;

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(e) = seq.next_element_seed(UniqueKeys)? {
            v.push(e);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate key '{k}'")));
            }
            let v = map.next_value_seed(UniqueKeys)?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<Item> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        s.push(input, &mut out);
        out
    }

    fn msg(s: &str) -> Item {
        Item::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_objects() {
        assert_eq!(
            split(b"{\"a\": \"}{\\\"\"}\r\n  {\"b\":[1,{}]}"),
            vec![msg("{\"a\": \"}{\\\"\"}"), msg("{\"b\":[1,{}]}")]
        );
    }

    #[test]
    fn byte_by_byte() {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for b in b"{\"execute\": \"stop\"}" {
            s.push(&[*b], &mut out);
        }
        assert_eq!(out, vec![msg("{\"execute\": \"stop\"}")]);
    }

    #[test]
    fn scalars_and_strays() {
        assert_eq!(
            split(b"123 \"x\" }"),
            vec![
                msg("123"),
                msg("\"x\""),
                Item::Error("JSON parse error, stray '}'".into())
            ]
        );
        assert_eq!(split(b"true{}"), vec![msg("true"), msg("{}")]);
    }

    #[test]
    fn unterminated_string_resyncs_at_newline() {
        let out = split(b"{\"execute\": \"sto\n{\"execute\": \"cont\"}");
        assert!(matches!(out[0], Item::Error(_)));
        assert_eq!(out[1], msg("{\"execute\": \"cont\"}"));
    }

    #[test]
    fn ff_resets() {
        let out = split(b"{\"a\": [\xff{}");
        assert!(matches!(out[0], Item::Error(_)));
        assert_eq!(out[1], msg("{}"));
        assert!(split(b"\xff\xfe").is_empty());
    }

    #[test]
    fn depth_limit() {
        let mut input = vec![b'['; MAX_NESTING];
        input.extend(vec![b']'; MAX_NESTING]);
        assert_eq!(split(&input).len(), 1);
        assert!(matches!(split(&input)[0], Item::Message(_)));
        let mut deep = vec![b'['; 100_000];
        deep.extend(vec![b']'; 100_000]);
        deep.extend(b"{}");
        assert_eq!(
            split(&deep),
            vec![
                Item::Error("JSON nesting depth limit exceeded".into()),
                msg("{}")
            ]
        );
    }

    #[test]
    fn size_limit() {
        let mut big = b"{\"a\": \"".to_vec();
        big.extend(vec![b'x'; MAX_MESSAGE_SIZE + 10]);
        big.extend(b"\"}{}");
        assert_eq!(
            split(&big),
            vec![
                Item::Error("JSON token size limit exceeded".into()),
                msg("{}")
            ]
        );
    }

    #[test]
    fn parse_errors() {
        assert!(parse_message(b"{\"a\": \xc3}")
            .unwrap_err()
            .contains("UTF-8"));
        assert!(parse_message(b"{\"a\" 1}")
            .unwrap_err()
            .starts_with("JSON parse error, "));
        assert!(parse_message(b"{\"a\": 1}").is_ok());
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let e = parse_message(br#"{"execute":"query-status","execute":"quit"}"#).unwrap_err();
        assert!(
            e.starts_with("JSON parse error, duplicate key 'execute'"),
            "{e}"
        );
        let e = parse_message(br#"{"execute":"x","arguments":{"a":[{"k":1,"k":2}]}}"#).unwrap_err();
        assert!(e.contains("duplicate key 'k'"), "{e}");
        // The same key in sibling objects is fine, and values come out as serde_json's.
        let v = parse_message(
            br#"{"a":{"k":1},"b":{"k":-2.5},"c":[true,null,"s",18446744073709551615]}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a":{"k":1},"b":{"k":-2.5},"c":[true,null,"s",18446744073709551615u64]})
        );
        assert!(parse_message(b"{} x").is_err(), "trailing characters");
    }
}
