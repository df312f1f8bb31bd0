#!/usr/bin/env bash
# Quick start, step 1: installs what is needed, builds the guest image and
# boots it under QEMU, proving that Docker runs a container in the guest.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_host_packages
say "building the guest image (cold: ~20 min on 2 cores, two kernel compiles; warm: seconds)"
IMAGE_DIR=$(guest-image/build.sh)
say "booting the guest under QEMU and running a container in it"
BERTH_GUEST_IMAGE_DIR=$IMAGE_DIR BERTH_E2E_REQUIRED=1 \
    cargo test --release -p berth-guest-agent --test qemu_selftest -- --nocapture
say "done: the guest image is in $IMAGE_DIR"
