#!/usr/bin/env bash
# Builds the guest kernel (vmlinux with the PVH note, and bzImage) from
# Debian's linux-source with kernel/x86_64.fragment on top of allnoconfig.
# Cached in $CACHE_DIR/kernel/<key>, key = hash of source version, fragment,
# patches and this script. Prints the cache directory.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ensure_packages linux-source build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils

SRC_TAR=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n1)
[ -n "$SRC_TAR" ] || die "linux-source is installed but /usr/src has no linux-source-*.tar.xz"
SRC_VER=$(dpkg-query -W -f='${Version}' "$(dpkg-query -S "$SRC_TAR" | cut -d: -f1)")
# BERTH_KERNEL_VARIANT=pvm-test builds kernel/pvm-test/fragment (instead of
# x86_64.fragment) with kernel/pvm-test/*.patch;
# the guest's own kernel (no variant) gets kernel/main/*.patch.
VARIANT=${BERTH_KERNEL_VARIANT:-}
FRAGMENTS=("$GI_DIR/kernel/x86_64.fragment")
PATCHES=$(ls "$GI_DIR"/kernel/*.patch 2>/dev/null || true)
if [ -z "$VARIANT" ]; then
    PATCHES="$PATCHES $(ls "$GI_DIR"/kernel/main/*.patch 2>/dev/null || true)"
fi
if [ -n "$VARIANT" ]; then
    [ -f "$GI_DIR/kernel/$VARIANT/fragment" ] || die "no kernel variant '$VARIANT' in $GI_DIR/kernel"
    # A variant's fragment stands alone (it says why in its header).
    FRAGMENTS=("$GI_DIR/kernel/$VARIANT/fragment")
    PATCHES="$PATCHES $(ls "$GI_DIR/kernel/$VARIANT"/*.patch 2>/dev/null || true)"
fi
KEY=$(inputs_key "$SRC_VER" "${FRAGMENTS[@]}" $PATCHES "$0")
DEST=$CACHE_DIR/kernel/$KEY

# The fragments in effect: for an option set twice, the later line wins.
effective_fragment() {
    cat "${FRAGMENTS[@]}" | awk '
        /^CONFIG_[A-Za-z0-9_]+=/ { n=$0; sub(/=.*/, "", n); last[n]=$0; order[++k]=n; next }
        /^# CONFIG_[A-Za-z0-9_]+ is not set/ { n=$2; last[n]=$0; order[++k]=n; next }
        END { for (i=1; i<=k; i++) if (!(order[i] in done)) { done[order[i]]=1; print last[order[i]] } }'
}

# Checks that every line of the fragment is in effect in the resolved config.
check_config() {
    local frag=$1 config=$2 bad=0 line name
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) name=${line%%=*} ;;
            "# CONFIG_"*" is not set") name=${line#\# }; name=${name%% *} ;;
            *) continue ;;
        esac
        if ! grep -qxF -- "$line" "$config"; then
            # "is not set" is also satisfied by the option being absent.
            if [[ "$line" == "# "* ]] && ! grep -q "^$name=" "$config"; then continue; fi
            printf '  fragment: %-50s resolved: %s\n' "$line" "$(grep -E "^$name=|^# $name is not set" "$config" || echo '(absent: a dependency is off)')" >&2
            bad=1
        fi
    done < "$frag"
    return $bad
}

build() {
    local out=$1
    local src=$CACHE_DIR/kernel/src-$SRC_VER
    if [ ! -f "$src/.done" ]; then
        log "unpacking $(basename "$SRC_TAR") ($SRC_VER)"
        rm -rf "$src"; mkdir -p "$src"
        tar -xf "$SRC_TAR" -C "$src" --strip-components=1
        touch "$src/.done"
    fi
    local tree=$CACHE_DIR/kernel/tree-$KEY
    if [ -n "$PATCHES" ] && [ ! -f "$tree/.done" ]; then
        rm -rf "$tree"; cp -a "$src" "$tree"
        for p in $PATCHES; do log "applying $(basename "$p")"; patch -d "$tree" -p1 --quiet < "$p"; done
        touch "$tree/.done"
    fi
    [ -n "$PATCHES" ] || tree=$src
    local b=$CACHE_DIR/kernel/build-$KEY
    mkdir -p "$b"
    effective_fragment > "$b/fragment"
    cat "$tree/kernel/configs/tiny-base.config" "$tree/kernel/configs/tiny.config" \
        "$tree/arch/x86/configs/tiny.config" "$b/fragment" > "$b/allno.config"
    make -s -C "$tree" O="$b" KCONFIG_ALLCONFIG="$b/allno.config" allnoconfig >/dev/null 2>&1
    if ! check_config "$b/fragment" "$b/.config"; then
        die "Kconfig resolved the lines above differently from ${FRAGMENTS[*]}; add their dependencies"
    fi
    log "compiling the kernel with $(nproc) jobs (about 10 minutes on 2 cores)"
    local t0=$SECONDS
    make -s -C "$tree" O="$b" -j"$(nproc)" bzImage 2>&1 | grep -v '^  ' >&2 || true
    [ -f "$b/arch/x86/boot/bzImage" ] || die "kernel build failed (see output above)"
    log "kernel compiled in $((SECONDS - t0)) s"
    cp "$b/arch/x86/boot/bzImage" "$out/bzImage"
    # Drop the symbol table; the ELF notes (PVH entry) stay.
    objcopy --strip-all "$b/vmlinux" "$out/vmlinux"
    cp "$b/.config" "$out/config"
    make -s -C "$tree" O="$b" kernelrelease > "$out/release"
    echo "$SRC_VER" > "$out/source-version"
}

cached_step "$DEST" build
echo "$DEST"
