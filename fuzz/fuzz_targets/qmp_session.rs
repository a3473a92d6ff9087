#![no_main]
//! Arbitrary bytes on a QMP connection: every reply is one ASCII JSON line
//! with `return` or `error.desc`, the buffer stays bounded, and the replies
//! do not depend on how the bytes were split into reads.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size; the rest is the stream.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let whole = qmp::fuzzing::run(stream, &[stream.len().max(1)]);
    let pieces = qmp::fuzzing::run(stream, &[usize::from(split % 64) + 1, 1, 7]);
    assert_eq!(whole, pieces, "replies depend on how the input was split");
});
