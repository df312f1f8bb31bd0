#!/usr/bin/env bash
# The VMM's benchmarks (figures for docs/benchmarks.md), each beside a
# reference measured in the same run:
#   virtio-blk vs fio on the same file, the vsock device vs a unix socket
#   pair, PIO exits on /dev/kvm vs QEMU -accel kvm, and berth-vmm's resident
#   memory with every device attached (from the kvm_pvm boot test).
set -euo pipefail
. "$(dirname "$0")/common.sh"
ensure_host_packages
command -v fio >/dev/null || {
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fio >/dev/null
}
cargo bench -p berth-devices --features test-utils --bench blk
cargo bench -p berth-devices --features test-utils --bench vsock
cargo bench -p berth-hypervisor --bench pio
export BERTH_GUEST_IMAGE_DIR=$(guest-image/build.sh)
cargo test --release -p berth-vmm --test kvm_boot -- boots_the_guest_kernel_to_init_on_kvm --nocapture 2>&1 | grep -E "resident|init|SKIPPED"
