#!/usr/bin/env bash
# Long fuzzing (not part of CI): runs every cargo-fuzz target for the same
# time, one after another, and prints each one's runs and crashes.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 600)
#   FUZZ_TARGETS="vsock_tx blk_request" scripts/fuzz.sh 60
# Needs the nightly toolchain (rustup toolchain install nightly) and
# cargo-fuzz (installed here if missing). Crashes are kept under
# fuzz/artifacts/<target>/; reproduce one with
#   cd fuzz && cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# Runs at the lowest CPU priority, so it can share the machine.
set -euo pipefail
. "$(dirname "$0")/common.sh"
SECS=${1:-600}
rustup toolchain list | grep -q '^nightly' || { echo "needs the nightly toolchain: rustup toolchain install nightly" >&2; exit 1; }
command -v cargo-fuzz >/dev/null || cargo install --quiet cargo-fuzz
cd fuzz
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
say "building the fuzz targets"
nice -n 19 cargo +nightly fuzz build >/dev/null
printf '\n%-16s %10s %14s %8s %s\n' target seconds runs crashes corpus
for t in $targets; do
    log=$(mktemp)
    set +e
    nice -n 19 cargo +nightly fuzz run "$t" -- -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
    corpus=$(find "corpus/$t" -type f 2>/dev/null | wc -l)
    printf '%-16s %10s %14s %8s %s\n' "$t" "$SECS" "${runs:-?}" "$crashes" "$corpus"
    if [ "$rc" -ne 0 ]; then
        echo "  $t exited $rc; last lines:" && tail -20 "$log" | sed 's/^/  /'
    fi
    rm -f "$log"
done
