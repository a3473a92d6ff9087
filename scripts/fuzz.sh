#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets) for SECONDS (default 30),
# starting from the committed seeds (fuzz/seeds/<target>) plus whatever
# corpus earlier runs left in fuzz/corpus/<target>. A crash, a panic, a leak
# or an ASan report fails the run; the input lands in fuzz/artifacts/<target>.
# Works on the stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz use its
# nightly flags); installs cargo-fuzz if missing.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# FUZZ_RUNS=N runs each target for N executions instead (no time limit).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install -q cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
(cd fuzz && cargo fuzz build -O)
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/target/$t.log"
  echo "fuzz: $t for ${secs}s"
  if [ -n "${FUZZ_RUNS:-}" ]; then limit="-runs=$FUZZ_RUNS"; else limit="-max_total_time=$secs"; fi
  if ! (cd fuzz && cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
      "$limit" -print_final_stats=1 -rss_limit_mb=4096 -timeout=10) >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t, log $log)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "fuzz: $t ok: ${runs:-?} executions, ${cov:-cov: ?}"
done
