//! Argument checking with QEMU's wording.
//!
//! Every command declares its parameters as a `&[Param]` schema. The
//! arguments object is checked against it the way QEMU's QObject input
//! visitor does (members in schema order, then unexpected members), so
//! error texts match QEMU's. Only then is it deserialised into the
//! command's `#[serde(deny_unknown_fields)]` struct.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::CommandError;

/// Type of a command parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ParamType {
    /// `str`
    Str,
    /// `int` (64-bit signed)
    Int,
    /// `bool` (no current command takes one; kept for upcoming ones)
    #[allow(dead_code)]
    Bool,
    /// A list of strings (`['str']`).
    StrList,
    /// A list of an enumeration's values.
    EnumList(&'static [&'static str]),
    /// A list of objects; the command checks their members itself.
    ObjectList,
}

/// One parameter of a command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    pub(crate) name: &'static str,
    pub(crate) ty: ParamType,
    pub(crate) optional: bool,
}

fn invalid_type(name: &str, expected: &str) -> CommandError {
    CommandError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn check_value(name: &str, ty: ParamType, value: &Value) -> Result<(), CommandError> {
    match ty {
        ParamType::Str if !value.is_string() => Err(invalid_type(name, "string")),
        ParamType::Int if !value.is_i64() => Err(invalid_type(name, "integer")),
        ParamType::Bool if !value.is_boolean() => Err(invalid_type(name, "boolean")),
        ParamType::ObjectList
            if !value
                .as_array()
                .is_some_and(|v| v.iter().all(Value::is_object)) =>
        {
            Err(invalid_type(name, "array"))
        }
        ParamType::StrList => {
            let items = value
                .as_array()
                .ok_or_else(|| invalid_type(name, "array"))?;
            match items.iter().position(|v| !v.is_string()) {
                Some(i) => Err(invalid_type(&format!("{name}[{i}]"), "string")),
                None => Ok(()),
            }
        }
        ParamType::EnumList(allowed) => {
            let items = value
                .as_array()
                .ok_or_else(|| invalid_type(name, "array"))?;
            for (i, item) in items.iter().enumerate() {
                let elem = format!("{name}[{i}]");
                let s = item.as_str().ok_or_else(|| invalid_type(&elem, "string"))?;
                if !allowed.contains(&s) {
                    return Err(CommandError::generic(format!(
                        "Parameter '{elem}' does not accept value '{s}'"
                    )));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks `args` against `params`; returns QEMU-worded GenericErrors.
pub(crate) fn check(args: &Map<String, Value>, params: &[Param]) -> Result<(), CommandError> {
    for p in params {
        match args.get(p.name) {
            Some(v) => check_value(p.name, p.ty, v)?,
            None if p.optional => {}
            None => {
                return Err(CommandError::generic(format!(
                    "Parameter '{}' is missing",
                    p.name
                )))
            }
        }
    }
    if let Some(extra) = args
        .keys()
        .find(|k| !params.iter().any(|p| p.name == k.as_str()))
    {
        return Err(CommandError::generic(format!(
            "Parameter '{extra}' is unexpected"
        )));
    }
    Ok(())
}

/// Deserialises already [`check`]ed arguments into a command struct.
pub(crate) fn from_map<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, CommandError> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| CommandError::generic(format!("Invalid arguments: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &[Param] = &[
        Param {
            name: "s",
            ty: ParamType::Str,
            optional: false,
        },
        Param {
            name: "i",
            ty: ParamType::Int,
            optional: true,
        },
        Param {
            name: "l",
            ty: ParamType::EnumList(&["oob"]),
            optional: true,
        },
        Param {
            name: "d",
            ty: ParamType::StrList,
            optional: true,
        },
    ];

    fn err(v: Value) -> String {
        let Value::Object(m) = v else { unreachable!() };
        check(&m, P).unwrap_err().desc
    }

    #[test]
    fn wording() {
        assert_eq!(err(json!({})), "Parameter 's' is missing");
        assert_eq!(
            err(json!({"s": 1})),
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            err(json!({"s": "", "i": 1.5})),
            "Invalid parameter type for 'i', expected: integer"
        );
        assert_eq!(err(json!({"s": "", "x": 1})), "Parameter 'x' is unexpected");
        assert_eq!(
            err(json!({"s": "", "l": {}})),
            "Invalid parameter type for 'l', expected: array"
        );
        assert_eq!(
            err(json!({"s": "", "l": [1]})),
            "Invalid parameter type for 'l[0]', expected: string"
        );
        assert_eq!(
            err(json!({"s": "", "l": ["oob", "x"]})),
            "Parameter 'l[1]' does not accept value 'x'"
        );
        assert_eq!(
            err(json!({"s": "", "d": "x"})),
            "Invalid parameter type for 'd', expected: array"
        );
        assert_eq!(
            err(json!({"s": "", "d": ["a", 2]})),
            "Invalid parameter type for 'd[1]', expected: string"
        );
        let Value::Object(ok) = json!({"s": "", "i": 3, "l": ["oob"], "d": []}) else {
            unreachable!()
        };
        assert!(check(&ok, P).is_ok());
    }
}
