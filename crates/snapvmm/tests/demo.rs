//! `snapvmm demo` runs the whole story and fails if any step fails.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn demo_snapshots_restores_and_finds_no_corruption() {
    let dir = TempDir::new("demo");
    let out = run_with_timeout(
        snapvmm(&[
            "demo",
            "--mem",
            "256M",
            "--cpus",
            "2",
            "--dir",
            dir.0.to_str().unwrap(),
        ]),
        Duration::from_secs(120),
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("corruption: none"), "{text}");
    // Both vCPUs resumed at the pass they were in when the snapshot was taken.
    assert_eq!(text.matches("(yes)").count(), 2, "{text}");
    assert!(dir.path("vm.snap").exists(), "--dir keeps the image");
}
