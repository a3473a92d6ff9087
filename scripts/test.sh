#!/usr/bin/env bash
# Runs the whole test suite: every Rust test (unit, end-to-end through the real
# binary against /dev/kvm, property tests) and the interoperability tests that
# drive snapvmm with QEMU's own Python client. Installs the Python client into
# .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import qemu.qmp' 2>/dev/null; then
  .venv/bin/pip install -q 'qemu.qmp>=0.0.3'
fi
export SNAPVMM_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace --all-targets "$@"
