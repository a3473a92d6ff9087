//! Structure of QMP input: `{"execute": NAME, "arguments": {...}, "id": ANY}`.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::CommandError;

/// QEMU version we claim to be (QMP clients compare against it).
pub const QEMU_VERSION: (i64, i64, i64) = (10, 0, 0);

/// The `package` string of the greeting and `query-version`.
pub fn package() -> String {
    concat!("snapvmm-", env!("CARGO_PKG_VERSION")).to_string()
}

/// `{"major": .., "minor": .., "micro": ..}`
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VersionTriple {
    pub(crate) major: i64,
    pub(crate) minor: i64,
    pub(crate) micro: i64,
}

/// QEMU's `VersionInfo`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VersionInfo {
    pub(crate) qemu: VersionTriple,
    pub(crate) package: String,
}

pub(crate) fn version_info() -> VersionInfo {
    let (major, minor, micro) = QEMU_VERSION;
    VersionInfo {
        qemu: VersionTriple {
            major,
            minor,
            micro,
        },
        package: package(),
    }
}

#[derive(Serialize)]
struct GreetingBody {
    version: VersionInfo,
    capabilities: [&'static str; 0],
}

#[derive(Serialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

/// The greeting line sent on connect.
pub(crate) fn greeting_line() -> String {
    let g = Greeting {
        qmp: GreetingBody {
            version: version_info(),
            capabilities: [],
        },
    };
    format!("{}\r\n", crate::json::to_qemu_json(&g))
}

/// A structurally valid command request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Request {
    pub(crate) name: String,
    pub(crate) args: Map<String, Value>,
}

/// Splits a parsed JSON value into (id, request) following QEMU's
/// `qmp_dispatch_check_obj()`. The id is returned even when the request
/// is invalid so that the error reply can echo it.
pub(crate) fn parse_request(value: Value) -> (Option<Value>, Result<Request, CommandError>) {
    let Value::Object(mut obj) = value else {
        return (
            None,
            Err(CommandError::generic("QMP input must be a JSON object")),
        );
    };
    let id = obj.remove("id");
    (id, check_object(obj))
}

fn check_object(obj: Map<String, Value>) -> Result<Request, CommandError> {
    let mut name = None;
    let mut args = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => name = Some(s),
                _ => {
                    return Err(CommandError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
            },
            "arguments" => match value {
                Value::Object(m) => args = m,
                _ => {
                    return Err(CommandError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
            },
            // "exec-oob" is only accepted once OOB is enabled, which we
            // never offer, so it falls here like in QEMU.
            other => {
                return Err(CommandError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    let name = name.ok_or_else(|| CommandError::generic("QMP input lacks member 'execute'"))?;
    Ok(Request { name, args })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desc(v: Value) -> (Option<Value>, String) {
        let (id, r) = parse_request(v);
        (id, r.unwrap_err().desc)
    }

    #[test]
    fn structure_errors() {
        assert_eq!(desc(json!([1])).1, "QMP input must be a JSON object");
        assert_eq!(
            desc(json!({"id": 5})),
            (Some(json!(5)), "QMP input lacks member 'execute'".into())
        );
        assert_eq!(
            desc(json!({"execute": 1})).1,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(json!({"execute": "x", "arguments": []})).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"exec-oob": "x"})).1,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "x", "foo": 1})).1,
            "QMP input member 'foo' is unexpected"
        );
    }

    #[test]
    fn greeting() {
        assert_eq!(
            greeting_line(),
            format!(
                "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"major\": 10, \"minor\": 0, \"micro\": 0}}, \"package\": \"snapvmm-{}\"}}, \"capabilities\": []}}}}\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}
