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
say "cargo test (end-to-end tests boot the guest under QEMU)"
export BERTH_GUEST_IMAGE_DIR=$IMAGE_DIR
export BERTH_E2E_REQUIRED=${BERTH_E2E_REQUIRED:-1}
cargo test --workspace -- --nocapture 2>&1 | tee target/test-output.log
