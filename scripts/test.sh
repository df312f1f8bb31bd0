#!/usr/bin/env bash
# Quick start, step 2: the whole test suite (what CI runs). Installs what it
# needs, checks formatting and lints, builds the guest image (cached), and
# runs every test, end-to-end boots included.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_host_packages
ensure_docker_cli
ensure_desktop_packages
ensure_ui
ensure_tauri_driver
say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --quiet --all-targets --all-features -- -D warnings
say "UI: svelte-check and Vitest"
(cd ui && npx svelte-check --tsconfig ./tsconfig.json --threshold warning && npx vitest run)
say "the desktop app with its UI embedded, for its end-to-end tests"
# `cargo test` rebuilds target/debug/berth-desktop as a dev build (which
# would look for Vite's dev server), so the e2e tests use a copy.
cargo build --quiet -p berth-desktop --features custom-protocol
cp target/debug/berth-desktop target/debug/berth-desktop-e2e
say "guest image"
IMAGE_DIR=$(guest-image/build.sh)
export BERTH_GUEST_IMAGE_DIR=$IMAGE_DIR
export BERTH_E2E_REQUIRED=${BERTH_E2E_REQUIRED:-1}
say "building every test"
if ! cargo test --workspace --no-run --message-format=json-render-diagnostics > target/test-build.json; then
    die "building the tests failed"
fi
# Each test binary, with the package directory cargo would run it in.
python3 - target/test-build.json > target/test-binaries.txt <<'PY'
import json, os, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(os.path.dirname(m["manifest_path"]), m["target"]["name"], m["executable"], sep="\t")
PY
# The Berth e2e suite runs one VM under single-threaded TCG: one core busy
# for ~25 min. Every other test (three of them boot VMs of their own) runs
# beside it on the other core; the desktop e2e runs alone afterwards (it
# drives a real webview against its own VM). Binaries are run as cargo
# would (in their package's directory), so that one run does not wait on
# the other's build lock and a failure does not hide the tests after it.
run_test() {  # dir name exe
    say "test binary $2 ($(basename "$3"))"
    (cd "$1" && exec "$3" --nocapture) < /dev/null
}
e2e=$(awk -F'\t' '$2 == "e2e_docker"' target/test-binaries.txt)
desktop=$(awk -F'\t' '$2 == "e2e_desktop"' target/test-binaries.txt)
[ -n "$e2e" ] && [ -n "$desktop" ] || die "cargo did not build both e2e suites (see target/test-binaries.txt)"
say "the Berth e2e suite (in the background: target/e2e-docker.log) and, beside it, every other test"
IFS=$'\t' read -r d n x <<< "$e2e"
run_test "$d" "$n" "$x" > target/e2e-docker.log 2>&1 &
e2e_pid=$!
: > target/test-failed.txt
while IFS=$'\t' read -r d n x; do
    case $n in e2e_docker|e2e_desktop) continue ;; esac
    run_test "$d" "$n" "$x" || echo "$n" >> target/test-failed.txt
done < target/test-binaries.txt 2>&1 | tee target/test-output.log
say "doc tests"
cargo test --workspace --doc 2>&1 | tee -a target/test-output.log || echo doc-tests >> target/test-failed.txt
e2e_rc=0
wait "$e2e_pid" || e2e_rc=$?
say "the Berth e2e suite's output (rc $e2e_rc)"
cat target/e2e-docker.log
cat target/e2e-docker.log >> target/test-output.log
[ "$e2e_rc" -eq 0 ] || echo e2e_docker >> target/test-failed.txt
say "the desktop app's e2e suite (alone)"
IFS=$'\t' read -r d n x <<< "$desktop"
run_test "$d" "$n" "$x" 2>&1 | tee -a target/test-output.log || echo e2e_desktop >> target/test-failed.txt
if [ -s target/test-failed.txt ]; then
    die "failed: $(tr '\n' ' ' < target/test-failed.txt)(output in target/test-output.log)"
fi
say "every test binary passed ($(wc -l < target/test-binaries.txt))"
