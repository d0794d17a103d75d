#!/usr/bin/env bash
# The project's one test command (the README names it; .ci/run calls it).
#
# Formatting, lints, every Rust test (unit and end-to-end, against real NATS and PostgreSQL),
# then the conformance test of the simulator against the official Loops JavaScript SDK.
# The services come from LOOPSYNC_TEST_NATS_URL / LOOPSYNC_TEST_PG_URL, else throwaway ones are
# started (scripts/services.sh). Whatever is missing on a fresh machine — nats-server,
# PostgreSQL, Node.js — is installed from Debian's packages when running as root.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
as_root() { [ "$(id -u)" -eq 0 ]; }
apt_updated=""
apt_install() {
  as_root || { echo "missing: $* (install it, or run this script as root)" >&2; exit 1; }
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

target_dir="${CARGO_TARGET_DIR:-target}"
start=$(date +%s)

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "cargo build (binaries)"
cargo build --workspace --bins --quiet
export LOOPSYNC_BIN="$target_dir/debug/loopsync"

log "services"
# shellcheck source=services.sh
. scripts/services.sh

log "cargo test"
cargo test --workspace

log "the NATS tests again, on nats-server $MODERN_NATS_VERSION"
LOOPSYNC_TEST_NATS_URL="$LOOPSYNC_TEST_NATS_MODERN_URL" cargo test -p loopsync-bus --lib
LOOPSYNC_TEST_NATS_URL="$LOOPSYNC_TEST_NATS_MODERN_URL" cargo test -p loopsync-e2e --test pipeline

log "Node tests (tests/js): Loops JS SDK conformance, compose file"
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
node --test tests/js/*.test.mjs

log "all tests passed in $(( $(date +%s) - start )) s"
