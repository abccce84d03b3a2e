#!/usr/bin/env bash
# Measures the ingest tier: builds the release binaries, then for each preset
# runs `chat-load compare PRESET`, which starts bare-server and then
# `chat serve` (each on a free port of 127.0.0.1, stopped by PID after its
# run) and runs the same preset against both in one invocation, so the
# ratios come from one stretch of time on this noisy machine.
#
#   benches/run.sh                       # every preset
#   benches/run.sh ingest-max fanout     # some
#   CHAT_LOAD_ARGS="--duration 8s" benches/run.sh mixed
#
# Outputs, per preset, in benches/results/ (or $OUT): PRESET.json (the
# report), PRESET.svg (the chart), PRESET.txt (the summary). Each preset
# stops by itself within its deadline (15 minutes at most; ingest-max and
# connections take 1 to 3 minutes each here).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
out="${OUT:-$repo_root/benches/results}"
if [ "$#" -gt 0 ]; then
    presets=("$@")
else
    presets=(ingest-max fanout connections mixed rooms-light rooms-busy)
fi

cargo build --release --locked -p chat -p benches --bins
mkdir -p "$out"
for preset in "${presets[@]}"; do
    printf '\n==> %s\n' "$preset" >&2
    # shellcheck disable=SC2086 # CHAT_LOAD_ARGS is a list of flags
    "$target_dir/release/chat-load" compare "$preset" \
        --chat-bin "$target_dir/release/chat" \
        --bare-bin "$target_dir/release/bare-server" \
        --report "$out/$preset.json" \
        --chart "$out/$preset.svg" \
        ${CHAT_LOAD_ARGS:-} | tee "$out/$preset.txt"
done
