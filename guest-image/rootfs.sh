#!/usr/bin/env bash
# Builds the guest's base root filesystem: Debian bookworm minbase plus
# rootfs/packages.txt, stripped of what a login-less guest never reads.
# Cached in $CACHE_DIR/rootfs/<key>/ as an unpacked tree plus versions.env,
# key = hash of the package list, suite and this script. Prints the directory.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ensure_packages debootstrap
SUITE=bookworm
MIRROR=${BERTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES_FILE=$GI_DIR/rootfs/packages.txt
KEY=$(inputs_key "$SUITE" "$PACKAGES_FILE" "$0")
DEST=$CACHE_DIR/rootfs/$KEY

build() {
    local out=$1 tree=$1/tree
    local pkgs
    pkgs=$(grep -v '^\s*#' "$PACKAGES_FILE" | grep -v '^\s*$' | tr '\n' ' ')
    log "debootstrap $SUITE (minbase) into the cache"
    local t0=$SECONDS
    debootstrap --variant=minbase "$SUITE" "$tree" "$MIRROR" > "$out/debootstrap.log" 2>&1 \
        || { tail -n 30 "$out/debootstrap.log" >&2; die "debootstrap failed"; }
    log "debootstrap done in $((SECONDS - t0)) s; installing: $pkgs"
    # No daemon may start inside the build chroot.
    printf '#!/bin/sh\nexit 101\n' > "$tree/usr/sbin/policy-rc.d"
    chmod +x "$tree/usr/sbin/policy-rc.d"
    # shellcheck disable=SC2086
    chroot "$tree" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs \
        > "$out/apt.log" 2>&1 || { tail -n 30 "$out/apt.log" >&2; die "apt-get install in the rootfs failed"; }
    {
        printf 'DOCKERD_VERSION=%s\n' "$(chroot "$tree" dpkg-query -W -f='${Version}' docker.io)"
        printf 'CONTAINERD_VERSION=%s\n' "$(chroot "$tree" dpkg-query -W -f='${Version}' containerd)"
        printf 'RUNC_VERSION=%s\n' "$(chroot "$tree" dpkg-query -W -f='${Version}' runc)"
        printf 'IPTABLES_VERSION=%s\n' "$(chroot "$tree" dpkg-query -W -f='${Version}' iptables)"
        printf 'DEBIAN_VERSION=%s\n' "$(cat "$tree/etc/debian_version")"
    } > "$out/versions.env"
    chroot "$tree" dpkg-query -W -f='${Package} ${Version}\n' > "$out/packages.lock"
    # Keep check-config.sh outside the image: the build runs it against the kernel.
    cp "$tree/usr/share/docker.io/contrib/check-config.sh" "$out/check-config.sh"
    rm -f "$tree/usr/sbin/policy-rc.d"
    # Strip what nothing in a login-less guest reads. The docker CLI is not
    # needed in the guest (clients talk to the forwarded socket).
    rm -rf "$tree"/usr/share/{doc,man,info,locale,lintian,linda,bug,bash-completion,zsh} \
        "$tree"/var/cache/apt/* "$tree"/var/lib/apt/lists/* "$tree"/var/log/* \
        "$tree"/usr/bin/docker "$tree"/etc/init.d/* "$tree"/etc/rc?.d \
        "$tree"/etc/systemd "$tree"/lib/systemd/system "$tree"/var/cache/debconf/*-old \
        "$tree"/etc/machine-id "$tree"/var/lib/dbus/machine-id
    log "base rootfs ready in $((SECONDS - t0)) s: $(du -sh "$tree" | cut -f1)"
}

cached_step "$DEST" build
echo "$DEST"
