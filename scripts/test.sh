#!/usr/bin/env bash
# The project's one test command (the README names it; .ci/run calls it).
#
# Formatting, lints, every Rust test (unit and end-to-end, against real NATS, PostgreSQL and
# MariaDB, and DuckDB files), then the conformance test of the simulator against the official
# Loops JavaScript SDK. The services come from LOOPSYNC_TEST_NATS_URL / LOOPSYNC_TEST_PG_URL /
# LOOPSYNC_TEST_MYSQL_URL, else throwaway ones are started (scripts/services.sh). Whatever is
# missing on a fresh machine — nats-server, PostgreSQL, MariaDB, Chromium and its driver,
# Node.js — is installed from Debian's packages when running as root.
#
# Every cargo command builds every feature (`--all-features`): DuckDB too, whose bundled C++
# build takes some 18 minutes cold on 2 cores, once per target folder (.ci/run keeps its target
# folder in a cache). LOOPSYNC_TEST_DUCKDB=0 leaves DuckDB out, for a quicker first run.
#
# A test that needs a service it does not have fails. LOOPSYNC_SKIP_SERVICES=1 starts no
# service and lets those tests skip instead; the summary then says how many were skipped.
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

start=$(date +%s)
CARGO_DENY_VERSION=0.20.2
features=(--all-features)
if [ "${LOOPSYNC_TEST_DUCKDB:-1}" = 0 ]; then features=(); fi
logs=$(mktemp -d "${TMPDIR:-/tmp}/loopsync-test-logs.XXXXXX")
export LOOPSYNC_SKIP_LOG="$logs/skipped"
: >"$LOOPSYNC_SKIP_LOG"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets "${features[@]}" --quiet -- -D warnings

log "cargo deny (sources, bans; advisories when the RustSec database can be fetched)"
# cargo-deny, built once from crates.io and kept outside the clone.
deny_root="${XDG_CACHE_HOME:-$HOME/.cache}/loopsync-test/cargo-deny-$CARGO_DENY_VERSION"
if [ ! -x "$deny_root/bin/cargo-deny" ]; then
  CARGO_TARGET_DIR="$deny_root/build" cargo install --quiet --locked "cargo-deny@$CARGO_DENY_VERSION" --root "$deny_root"
  rm -rf "$deny_root/build"
fi
deny() { PATH="$deny_root/bin:$PATH" cargo deny --log-level error "$@"; }
deny check bans sources
# The advisory database lives on GitHub: where it is out of reach, the summary says so.
if timeout 120 bash -c "$(declare -f deny); deny_root='$deny_root'; deny fetch db" >/dev/null 2>&1; then
  deny check --disable-fetch advisories
  advisories="checked"
else
  advisories="NOT checked: the RustSec advisory database (GitHub) could not be fetched"
fi

log "cargo build (binaries)"
cargo build --workspace --bins "${features[@]}" --quiet
# Absolute, wherever the target folder is (CARGO_TARGET_DIR, or ./target): tests run in their
# package folders, and the Node tests from the repository's root.
target_dir=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export LOOPSYNC_BIN="$target_dir/debug/loopsync"
[ -x "$LOOPSYNC_BIN" ] || { echo "no loopsync binary at $LOOPSYNC_BIN" >&2; exit 1; }

log "services"
if [ "${LOOPSYNC_SKIP_SERVICES:-}" = 1 ]; then
  echo "LOOPSYNC_SKIP_SERVICES=1: no service is started; the tests that need one are skipped"
else
  # shellcheck source=services.sh
  . scripts/services.sh
fi

# Runs a cargo test command, keeping its output for the summary.
# --no-fail-fast: a failing test binary does not hide the failures of the ones after it.
cargo_test() {
  cargo test --no-fail-fast "$@" 2>&1 | tee -a "$logs/cargo"
}

log "cargo test"
# The NATS TLS test makes its certificates with openssl.
command -v openssl >/dev/null || apt_install openssl
cargo_test --workspace "${features[@]}"

if [ -n "${LOOPSYNC_TEST_NATS_MODERN_URL:-}" ]; then
  log "the NATS tests again, on nats-server $MODERN_NATS_VERSION"
  LOOPSYNC_TEST_NATS_URL="$LOOPSYNC_TEST_NATS_MODERN_URL" cargo_test -p loopsync-bus --lib "${features[@]}"
  LOOPSYNC_TEST_NATS_URL="$LOOPSYNC_TEST_NATS_MODERN_URL" \
    LOOPSYNC_TEST_NATS_BIN="${LOOPSYNC_TEST_NATS_MODERN_BIN:-}" \
    cargo_test -p loopsync-e2e "${features[@]}" --test pipeline --test failures --test exactly_once --test events \
      --test operable
fi

log "Node tests (tests/js): Loops JS SDK conformance (loops 6.x and 7.x), compose file"
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
node --test tests/js/*.test.mjs 2>&1 | tee "$logs/node"

log "summary"
# cargo: "test result: ok. N passed; N failed; N ignored; …" per test binary; node: "# pass N".
read -r rust_passed rust_failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$logs/cargo")
read -r node_passed node_failed node_skipped < <(awk '/^# pass / { p = $3 } /^# fail / { f = $3 } /^# skipped / { s = $3 } END { print p + 0, f + 0, s + 0 }' "$logs/node")
skipped=$(wc -l <"$LOOPSYNC_SKIP_LOG")
echo "cargo: $rust_passed tests passed ($skipped of them only skipped for want of a service), $rust_failed failed"
echo "node:  $node_passed tests passed, $node_failed failed, $node_skipped skipped (SDK methods the simulator does not serve)"
if [ "$skipped" -gt 0 ]; then
  echo "skipped, for want of a service:"
  sed 's/^/  /' "$LOOPSYNC_SKIP_LOG"
fi
echo "cargo deny: sources and bans checked; advisories $advisories"
echo "total: $(( rust_passed - skipped + node_passed )) passed, $(( rust_failed + node_failed )) failed, $(( skipped + node_skipped )) skipped"
echo "in $(( $(date +%s) - start )) s"
rm -rf "$logs"
