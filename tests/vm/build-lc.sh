#!/usr/bin/env bash
# Builds lc (release) for demo.sh and run.sh and prints the path of the binary.
# Under sudo it builds as the user who ran sudo (SUDO_USER), in that user's login
# environment: root often has no Rust, and a root-owned target/ would break the user's
# later builds. Run by a user, or by root without sudo, it builds as whoever runs it.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)

# $1: the checkout. rustup's default cargo directory is a fallback behind the PATH.
# The JSON messages name the binary wherever the user's cargo puts its target directory.
# shellcheck disable=SC2016 # expanded by the building user's shell
build='PATH="$PATH:$HOME/.cargo/bin"
command -v cargo >/dev/null || { echo "build-lc: user $(id -un) has no cargo (README: Quick start)" >&2; exit 1; }
cd "$1" && cargo build --release --quiet --bin lc --message-format=json-render-diagnostics'
if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    echo "[build-lc] building lc as $SUDO_USER" >&2
    out=$(sudo -u "$SUDO_USER" -H bash -lc "$build" build-lc "$top")
else
    out=$(bash -c "$build" build-lc "$top")
fi
bin=$(printf '%s\n' "$out" | sed -n 's/.*"executable":"\([^"]*\/lc\)".*/\1/p' | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "build-lc: cargo reported no lc binary" >&2
    exit 1
fi
echo "$bin"
