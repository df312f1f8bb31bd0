#!/usr/bin/env bash
# The one guest-image build command. Idempotent: installs its own Debian
# build dependencies, reuses the cached kernel and base root filesystem when
# their inputs are unchanged, rebuilds the agent, re-assembles the image in
# seconds, and prints the directory holding the artifacts:
#   vmlinux  bzImage  rootfs.<fmt>  kernel.config  check-config.txt  manifest.json
# Environment: BERTH_CACHE_DIR (default ~/.cache/berth), BERTH_GUEST_IMAGE_DIR
# (default target/guest-image), BERTH_ROOTFS_FORMAT (erofs|squashfs|ext4).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

FORMAT=${BERTH_ROOTFS_FORMAT:-erofs}
case "$FORMAT" in erofs|squashfs|ext4) ;; *) die "BERTH_ROOTFS_FORMAT must be erofs, squashfs or ext4, not '$FORMAT'";; esac
# The kernel command line every VMM passes (it appends its own
# virtio_mmio.device= words). reboot=k: the agent's final reset goes through
# the i8042, which ends the VM; panic=-1: a guest panic ends it at once.
CMDLINE="console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootfstype=$FORMAT init=/sbin/berth-agent i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

T0=$SECONDS
ensure_packages erofs-utils squashfs-tools e2fsprogs python3 git
KERNEL=$("$GI_DIR/kernel.sh")
# The kvm_pvm variant, only for berth-vmm's boot test (see kernel/pvm-test/).
TEST_KERNEL=$(BERTH_KERNEL_VARIANT=pvm-test "$GI_DIR/kernel.sh")
ROOTFS=$("$GI_DIR/rootfs.sh")
# Kernel build trees (1.5 GB each) are only needed until their cache entry
# is complete.
for b in "$CACHE_DIR"/kernel/build-* "$CACHE_DIR"/kernel/tree-*; do
    [ -d "$b" ] || continue
    key=${b##*-}
    [ -f "$CACHE_DIR/kernel/$key/.done" ] && rm -rf "$b"
done

log "building the agent (static, release)"
TARGET=x86_64-unknown-linux-gnu
# Static so PID 1 depends on nothing in the image.
( cd "$REPO_DIR" && CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release --locked -p berth-guest-agent --target "$TARGET" ) \
    || die "building the guest agent failed"
AGENT=$REPO_DIR/target/$TARGET/release/berth-agent

log "assembling the root filesystem ($FORMAT)"
mkdir -p "$OUT_DIR"
STAGE=$OUT_DIR/.staging
rm -rf "$STAGE"
# Hard links: instant, and nothing below modifies a file in place, so the
# cached tree stays pristine (new files and links replace, never write).
cp -al "$ROOTFS/tree" "$STAGE"
install -m 0755 "$AGENT" "$STAGE/sbin/berth-agent.new" && mv "$STAGE/sbin/berth-agent.new" "$STAGE/sbin/berth-agent"
ln -sfn berth-agent "$STAGE/sbin/init"
# The root is read-only: files that change at run time live under /run.
ln -sfn ../run/berth/resolv.conf "$STAGE/etc/resolv.conf"
ln -sfn ../run/berth/hosts "$STAGE/etc/hosts"
ln -sfn ../proc/self/mounts "$STAGE/etc/mtab"
echo berth > "$STAGE/etc/hostname.new" && mv "$STAGE/etc/hostname.new" "$STAGE/etc/hostname"
# Mount points: the data disk and what is bound from it, scratch tmpfs.
mkdir -p "$STAGE"/var/lib/{berth,docker,containerd} "$STAGE/etc/docker" \
    "$STAGE"/{dev,proc,sys,run,tmp,root} "$STAGE/var/log"
# Empty parents for shared host folders (the agent lays a tmpfs over one to
# make a share's mount point): macOS and Linux homes, volumes and temp dirs.
mkdir -p "$STAGE"/{Users,Volumes,private,home,mnt,media,srv} "$STAGE/var/folders"

IMG=$OUT_DIR/rootfs.$FORMAT
rm -f "$OUT_DIR"/rootfs.* "$IMG.tmp"
case "$FORMAT" in
    erofs) mkfs.erofs --quiet -T0 -U 6b657274-6869-6d61-6765-000000000001 "$IMG.tmp" "$STAGE" >/dev/null ;;
    squashfs) mksquashfs "$STAGE" "$IMG.tmp" -quiet -noappend -comp zstd -Xcompression-level 3 -all-time 0 -no-progress >/dev/null ;;
    ext4)
        size_mb=$(( $(du -sm "$STAGE" | cut -f1) * 115 / 100 + 32 ))
        truncate -s "${size_mb}M" "$IMG.tmp"
        mkfs.ext4 -q -F -d "$STAGE" -L berth-root -m 0 -E root_owner=0:0 "$IMG.tmp" ;;
esac
mv "$IMG.tmp" "$IMG"
rm -rf "$STAGE"

cp "$KERNEL/vmlinux" "$OUT_DIR/vmlinux.tmp" && mv "$OUT_DIR/vmlinux.tmp" "$OUT_DIR/vmlinux"
cp "$KERNEL/bzImage" "$OUT_DIR/bzImage.tmp" && mv "$OUT_DIR/bzImage.tmp" "$OUT_DIR/bzImage"
cp "$KERNEL/config" "$OUT_DIR/kernel.config"
mkdir -p "$OUT_DIR/test"
cp "$TEST_KERNEL/vmlinux" "$OUT_DIR/test/vmlinux-pvm-test.tmp" && mv "$OUT_DIR/test/vmlinux-pvm-test.tmp" "$OUT_DIR/test/vmlinux-pvm-test"
cp "$TEST_KERNEL/bzImage" "$OUT_DIR/test/bzImage-pvm-test.tmp" && mv "$OUT_DIR/test/bzImage-pvm-test.tmp" "$OUT_DIR/test/bzImage-pvm-test"

# moby's own verdict on the kernel configuration.
bash "$ROOTFS/check-config.sh" "$OUT_DIR/kernel.config" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' > "$OUT_DIR/check-config.txt" || true
python3 "$GI_DIR/check_config_verdict.py" "$OUT_DIR/check-config.txt" \
    || die "check-config.sh reports required kernel options missing (see $OUT_DIR/check-config.txt)"

AGENT_VERSION=$(cd "$REPO_DIR" && sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
GIT_REV=$(git -C "$REPO_DIR" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$REPO_DIR" status --porcelain 2>/dev/null)" ] || GIT_REV="$GIT_REV-dirty"
python3 "$GI_DIR/manifest.py" --out "$OUT_DIR" --kernel-dir "$KERNEL" --versions "$ROOTFS/versions.env" \
    --agent-version "$AGENT_VERSION+$GIT_REV" --cmdline "$CMDLINE" --rootfs "rootfs.$FORMAT" --format "$FORMAT"
log "guest image ready in $((SECONDS - T0)) s"
echo "$OUT_DIR"
