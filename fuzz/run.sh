#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with stable Rust and runs each for a bounded
# time from its checked-in seeds: fuzz/run.sh [SECONDS per target, default 20]
# [TARGET...] (default: every [[bin]] of fuzz/Cargo.toml).
#
# Stable, not nightly: cargo-fuzz's default build needs nightly for -Zsanitizer, but
# libFuzzer itself only needs the SanitizerCoverage instrumentation, which stable rustc
# runs through codegen options (what `cargo fuzz build -s none` passes). Without a
# sanitizer a target finds panics (overflow checks and debug assertions are on), not
# undefined behaviour; lc's only unsafe code (handler/shm.rs) is tested on its own.
# Needs a C++ compiler for libfuzzer-sys (Debian: build-essential).
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-20}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^lc-fuzz$')
fi

# libfuzzer-sys compiles libFuzzer's C++ sources.
if ! command -v c++ >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
fi

export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# Instrumented objects must not mix with ordinary ones: a target dir of their own. An
# explicit --target keeps RUSTFLAGS off build scripts and proc macros (which would not
# link without libFuzzer's hooks), as cargo-fuzz does.
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz-stable"
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --locked --release --target "$host" --target-dir "$target_dir" --bins
bin="$target_dir/$host/release"

work=$(mktemp -d "${TMPDIR:-/tmp}/lc-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s"
    # New inputs go to a scratch corpus; the seeds stay as checked in.
    mkdir -p "$work/$t"
    if ! "$bin/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/" "$work/$t" "seeds/$t" \
        >"$work/$t.log" 2>&1; then
        tail -n 40 "$work/$t.log"
        for a in "$work"/crash-* "$work"/timeout-* "$work"/oom-*; do
            [ -e "$a" ] || continue
            mkdir -p artifacts/"$t"
            cp "$a" artifacts/"$t"/
            echo "input kept in fuzz/artifacts/$t/$(basename "$a")"
            rm -f "$a"
        done
        failed+=("$t")
    else
        grep -E '^stat::(number_of_executed_units|new_units_added)|cov: ' "$work/$t.log" | tail -n 3
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets failed: ${failed[*]}" >&2
    exit 1
fi
