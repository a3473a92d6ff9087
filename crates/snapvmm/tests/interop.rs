//! Runs tests/interop_qemu_qmp.py: snapvmm driven by QEMU's own Python QMP
//! client and qmp-shell. scripts/test.sh installs them into .venv and sets
//! SNAPVMM_PYTHON; a bare `cargo test` without it reports the test skipped.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn qemu_python_client_and_qmp_shell_work_unchanged() {
    let Some(python) = std::env::var_os("SNAPVMM_PYTHON") else {
        eprintln!("skipped: SNAPVMM_PYTHON not set (run scripts/test.sh)");
        return;
    };
    let d = TempDir::new("interop");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop_qemu_qmp.py"
    );
    let mut c = std::process::Command::new(python);
    c.arg(script).arg(bin()).arg(&d.0);
    let o = run_with_timeout(c, Duration::from_secs(120));
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).contains("interop: 1 passed"));
}
