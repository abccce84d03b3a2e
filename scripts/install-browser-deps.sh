#!/usr/bin/env bash
# Installs what the real-browser test (tests/browser) needs: Debian's Chromium
# at /usr/bin/chromium and the test's npm dependencies (playwright-core only;
# it drives the system Chromium, no browser download ever happens).
#
# Idempotent: Chromium is installed only when missing, and `npm ci` runs only
# when node_modules does not already match package-lock.json. Runs as root on
# Debian 12 (the project's machines and CI); from any working directory.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="$repo_root/tests/browser"

log() { printf 'install-browser-deps: %s\n' "$*" >&2; }

if [[ ! -x /usr/bin/chromium ]]; then
    log "installing chromium from debian packages"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
else
    log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
fi

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool not found; the browser test needs Node.js >= 20 with npm"
        exit 1
    fi
done

# node_modules is up to date when npm's hidden lockfile records exactly the
# packages (name, version, integrity) that package-lock.json asks for.
node_modules_current() {
    [[ -f "$browser_dir/node_modules/.package-lock.json" ]] || return 1
    node - "$browser_dir/package-lock.json" "$browser_dir/node_modules/.package-lock.json" <<'EOF'
const fs = require('node:fs');
const [wantPath, havePath] = process.argv.slice(2);
const pick = (path) => {
  const pkgs = JSON.parse(fs.readFileSync(path, 'utf8')).packages || {};
  const out = {};
  for (const [name, p] of Object.entries(pkgs)) {
    if (name === '' || p.extraneous) continue;
    out[name] = [p.version, p.integrity || null];
  }
  return out;
};
const want = pick(wantPath);
const have = pick(havePath);
const same = Object.keys(want).length === Object.keys(have).length &&
  Object.entries(want).every(([k, v]) => have[k] && have[k][0] === v[0] && have[k][1] === v[1]);
process.exit(same ? 0 : 1);
EOF
}

if node_modules_current; then
    log "tests/browser/node_modules is up to date"
else
    log "installing tests/browser npm dependencies"
    (cd "$repo_root" && npm ci --prefix tests/browser --no-audit --no-fund)
fi
