//! JSON output in QEMU's style: `", "` and `": "` separators, non-ASCII and
//! control characters escaped as upper-case `\uXXXX`, one object per line
//! terminated by `"\r\n"`.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};
use serde_json::Value;

use crate::error::CommandError;

/// serde_json formatter reproducing QEMU's `qobject_to_json()` layout.
struct QemuFormatter;

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                let mut buf = [0u8; 4];
                w.write_all(c.encode_utf8(&mut buf).as_bytes())?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04X}")?;
                }
            }
        }
        Ok(())
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        match escape {
            CharEscape::AsciiControl(b) => write!(w, "\\u{b:04X}"),
            other => CompactFormatter.write_char_escape(w, other),
        }
    }
}

/// Serialises `value` the way QEMU would (without line terminator).
pub(crate) fn to_qemu_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    if value.serialize(&mut ser).is_err() {
        // Only reachable with non-string map keys, which we never build.
        return "null".to_string();
    }
    // The formatter only ever writes valid UTF-8 (ASCII, in fact).
    String::from_utf8(out).unwrap_or_default()
}

/// `{"return": VALUE, "id": ID}\r\n`
pub(crate) fn return_line(value: &Value, id: Option<&Value>) -> String {
    let mut s = format!("{{\"return\": {}", to_qemu_json(value));
    push_id(&mut s, id);
    s
}

/// `{"error": {"class": C, "desc": D}, "id": ID}\r\n`
pub(crate) fn error_line(err: &CommandError, id: Option<&Value>) -> String {
    let mut s = format!("{{\"error\": {}", to_qemu_json(err));
    push_id(&mut s, id);
    s
}

fn push_id(s: &mut String, id: Option<&Value>) {
    if let Some(id) = id {
        s.push_str(", \"id\": ");
        s.push_str(&to_qemu_json(id));
    }
    s.push_str("}\r\n");
}

/// `{"timestamp": {...}, "event": NAME, "data": DATA}\r\n`
pub(crate) fn event_line(name: &str, data: Option<&Value>, seconds: i64, micros: i64) -> String {
    let mut s = format!(
        "{{\"timestamp\": {{\"seconds\": {seconds}, \"microseconds\": {micros}}}, \"event\": {}",
        to_qemu_json(name)
    );
    if let Some(data) = data {
        s.push_str(", \"data\": ");
        s.push_str(&to_qemu_json(data));
    }
    s.push_str("}\r\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_layout() {
        let v = json!({"a": [1, 2], "b": {}});
        assert_eq!(to_qemu_json(&v), r#"{"a": [1, 2], "b": {}}"#);
    }

    #[test]
    fn escapes_like_qemu() {
        assert_eq!(to_qemu_json("é\u{1}\n\"/"), r#""\u00E9\u0001\n\"/""#);
        assert_eq!(to_qemu_json("\u{1F600}"), r#""\uD83D\uDE00""#);
        assert_eq!(to_qemu_json("\u{7f}"), r#""\u007F""#);
    }

    #[test]
    fn lines() {
        let id = json!("x");
        assert_eq!(
            return_line(&json!({}), Some(&id)),
            "{\"return\": {}, \"id\": \"x\"}\r\n"
        );
        let e = CommandError::generic("bad");
        assert_eq!(
            error_line(&e, None),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"bad\"}}\r\n"
        );
        assert_eq!(
            event_line("STOP", None, 1, 2),
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n"
        );
    }
}
