# Shared by scripts/*.sh. Sourced.
# shellcheck shell=bash
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
die() { printf '\n==> error: %s\n' "$*" >&2; exit 1; }
say() { printf '\n==> [%s, %d s in] %s\n' "$(date +%T)" "$SECONDS" "$*"; }

# Debian packages the build and the tests need (idempotent).
ensure_host_packages() {
    local want=(build-essential pkg-config qemu-system-x86 busybox-static e2fsprogs python3 git docker-compose passt sqlite3)
    local missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    command -v cargo >/dev/null || { echo "cargo is needed: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
}

# What the desktop app needs to build (WebKitGTK, GTK, the tray's
# appindicator) and its end-to-end tests (Xvfb, WebKit's WebDriver, a
# session bus, gdbus for the tray, ImageMagick for screenshots).
ensure_desktop_packages() {
    local want=(libwebkit2gtk-4.1-dev libgtk-3-dev librsvg2-dev libayatana-appindicator3-dev libssl-dev libxdo-dev
        file xvfb xauth webkit2gtk-driver dbus-x11 libglib2.0-bin imagemagick xdotool x11-utils docker-registry nodejs npm)
    local missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    # Node.js may come from elsewhere than Debian (Vite 8 needs >= 20.19).
    if command -v node >/dev/null && command -v npm >/dev/null; then
        missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
        read -r -a missing <<<"${missing[*]}"
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages for the desktop app: ${missing[*]}"
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The UI's npm packages (from the lockfile) and its build into ui/dist,
# which the app embeds. npm's own cache makes a repeat install quick.
ensure_ui() {
    if [ ! -d ui/node_modules ] || [ ui/package-lock.json -nt ui/node_modules/.package-lock.json ]; then
        say "npm ci (ui/)"
        (cd ui && npm ci --no-audit --no-fund --loglevel=error)
    fi
    say "building the UI (vite)"
    (cd ui && npx vite build --logLevel warn)
}

# tauri-driver, the WebDriver server the desktop e2e tests drive the app
# through (cargo install, ~30 s once; kept in ~/.cargo/bin).
ensure_tauri_driver() {
    command -v tauri-driver >/dev/null && return 0
    say "installing tauri-driver"
    cargo install --quiet tauri-driver --version '^2' --locked
}

# The docker CLI, the client users bring. Debian 12 ships it only inside
# docker.io (which would also install and start a host dockerd), so when no
# `docker` is on PATH we unpack just the client from that package.
ensure_docker_cli() {
    command -v docker >/dev/null && return 0
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/berth/docker-cli" bin
    if [ ! -x "$cache/usr/bin/docker" ]; then
        say "no docker CLI on PATH: unpacking the client from Debian's docker.io package"
        mkdir -p "$cache/deb"
        (cd "$cache/deb" && apt-get download docker.io >/dev/null)
        dpkg-deb -x "$cache"/deb/docker.io_*.deb "$cache"
    fi
    if [ "$(id -u)" -eq 0 ]; then bin=/usr/local/bin; else bin="$HOME/.local/bin"; mkdir -p "$bin"; fi
    ln -sf "$cache/usr/bin/docker" "$bin/docker"
    export PATH="$bin:$PATH"
    say "installed the docker CLI as $bin/docker"
}
