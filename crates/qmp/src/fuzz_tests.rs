//! Property tests: arbitrary input never panics, never buffers more than
//! the limit, always yields well-formed replies, and does not depend on
//! how the input is split into reads.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::fuzzing::{run, Connection};

fn session() -> Connection {
    Connection::default()
}

/// Bytes biased towards JSON structure and QMP keywords.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b":".to_vec()),
        Just(b",".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\xff".to_vec()),
        Just(b"\xc3".to_vec()),
        Just(b"1".to_vec()),
        Just(b"true".to_vec()),
        Just(b"\"execute\"".to_vec()),
        Just(b"\"arguments\"".to_vec()),
        Just(b"\"id\"".to_vec()),
        Just(b"\"qmp_capabilities\"".to_vec()),
        Just(b"\"human-monitor-command\"".to_vec()),
        Just(b"\"command-line\"".to_vec()),
        Just(b"\"info status\"".to_vec()),
        Just(b"\"query-status\"".to_vec()),
        any::<u8>().prop_map(|b| vec![b]),
    ];
    prop::collection::vec(token, 0..200).prop_map(|v| v.concat())
}

fn small_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2048),
                       chunks in prop::collection::vec(1usize..64, 1..8)) {
        run(&data, &chunks);
    }

    #[test]
    fn jsonish_input_is_split_independent(data in jsonish(),
                                          chunks in prop::collection::vec(1usize..16, 1..8)) {
        let whole = run(&data, &[data.len().max(1)]);
        let pieces = run(&data, &chunks);
        prop_assert_eq!(whole, pieces);
    }

    #[test]
    fn any_id_is_echoed(id in small_json()) {
        let mut s = session();
        let msg = json!({"execute": "qmp_capabilities", "id": id}).to_string();
        let replies = s.feed_checked(msg.as_bytes());
        prop_assert_eq!(replies.len(), 1);
        let v: Value = serde_json::from_str(&replies[0]).unwrap();
        prop_assert_eq!(&v["id"], &id);
        prop_assert_eq!(&v["return"], &json!({}));
    }

    #[test]
    fn hmp_never_fails(line in "\\PC{0,40}") {
        let mut s = session();
        s.feed_checked(b"{\"execute\":\"qmp_capabilities\"}");
        let msg = json!({"execute": "human-monitor-command", "arguments": {"command-line": line}});
        let replies = s.feed_checked(msg.to_string().as_bytes());
        let v: Value = serde_json::from_str(&replies[0]).unwrap();
        prop_assert!(v["return"].is_string(), "{}", v);
    }
}
