#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each, one
# after the other, and says per target how many inputs ran and whether it
# crashed. Exits non-zero when one did.
#
#   scripts/fuzz.sh SECONDS [TARGET...]     default: every fuzz/fuzz_targets/*.rs
#
# Nothing is written into the repo: each target's corpus (seeded from
# fuzz/seeds/TARGET), crash artifacts, log and scratch files live under
# ${FUZZ_WORK:-/tmp/chat-fuzz}/TARGET, and the build under
# ${CARGO_TARGET_DIR:-<repo>/target}/fuzz. The corpus is kept between runs, so
# a later run starts from what earlier ones found.
#
# cargo-fuzz needs a nightly compiler: the rustup toolchain `nightly` when it
# is installed, else the stable one with RUSTC_BOOTSTRAP=1 (also forced by
# FUZZ_RUSTC_BOOTSTRAP=1). cargo-fuzz itself is installed when missing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

usage() { echo "usage: scripts/fuzz.sh SECONDS [TARGET...]" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
seconds="$1"
shift
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=()
    for file in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$file" .rs)")
    done
fi
for target in "${targets[@]}"; do
    [[ -f "fuzz/fuzz_targets/$target.rs" ]] || { echo "no fuzz target $target (fuzz/fuzz_targets/$target.rs)" >&2; exit 2; }
done

work="${FUZZ_WORK:-/tmp/chat-fuzz}"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}/fuzz"

if [[ "${FUZZ_RUSTC_BOOTSTRAP:-0}" != 1 ]] && rustc +nightly --version >/dev/null 2>&1; then
    cargo=(cargo +nightly)
    compiler="$(rustc +nightly --version)"
else
    cargo=(env RUSTC_BOOTSTRAP=1 cargo)
    compiler="$(rustc --version) with RUSTC_BOOTSTRAP=1"
fi
echo "fuzz: compiler $compiler" >&2
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# Builds first, with its output shown; the runs below then only fuzz.
for target in "${targets[@]}"; do
    "${cargo[@]}" fuzz build --target-dir "$target_dir" "$target"
done

summary=()
crashed=0
for target in "${targets[@]}"; do
    dir="$work/$target"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    cp -n "fuzz/seeds/$target"/* "$dir/corpus/" 2>/dev/null || true
    # The target's scratch files (the http target's log and store); emptied
    # after the run, since libFuzzer exits without running destructors.
    rm -rf "$dir/tmp"
    mkdir -p "$dir/tmp"
    touch "$dir/started"
    echo "fuzz: $target for ${seconds}s, corpus $dir/corpus, log $dir/fuzz.log" >&2
    status=0
    # The second -artifact_prefix overrides the one cargo-fuzz passes
    # (fuzz/artifacts/TARGET/, inside the repo).
    TMPDIR="$dir/tmp" "${cargo[@]}" fuzz run --target-dir "$target_dir" "$target" "$dir/corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 -max_len=8192 \
        -artifact_prefix="$dir/artifacts/" >"$dir/fuzz.log" 2>&1 || status=$?
    rm -rf "$dir/tmp"
    # cargo-fuzz makes fuzz/artifacts/TARGET/ even when unused.
    rmdir "fuzz/artifacts/$target" fuzz/artifacts 2>/dev/null || true
    execs="$(grep -o 'stat::number_of_executed_units: [0-9]*' "$dir/fuzz.log" | tail -n 1 | grep -o '[0-9]*$' || true)"
    found="$(find "$dir/artifacts" -type f -newer "$dir/started")"
    if [[ $status -ne 0 || -n $found ]]; then
        crashed=1
        result="CRASHED (exit $status)"
        tail -n 40 "$dir/fuzz.log" >&2
        [[ -z $found ]] || printf 'fuzz: %s: input saved as %s\n' "$target" $found >&2
    else
        result="ok"
    fi
    summary+=("$(printf '%-14s %12s executions  %s' "$target" "${execs:-?}" "$result")")
done

echo >&2
printf 'fuzz: %s\n' "${summary[@]}" >&2
exit "$crashed"
