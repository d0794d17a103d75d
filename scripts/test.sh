#!/usr/bin/env bash
# The project's one test command (the README names it; .ci/run calls it).
#
# Formatting, lints, every Rust test (unit and end-to-end, against real NATS, PostgreSQL and
# MariaDB, and DuckDB files), then the conformance test of the simulator against the official
# Loops JavaScript SDK, the checks of the compose file and of deploy/'s dashboard, and
# promtool's tests of the alert rules. The services come from LOOPSYNC_TEST_NATS_URL /
# LOOPSYNC_TEST_PG_URL / LOOPSYNC_TEST_MYSQL_URL, else throwaway ones are started
# (scripts/services.sh). Whatever is missing on a fresh machine — nats-server, PostgreSQL,
# MariaDB, Chromium and its driver, Node.js, promtool — is installed from Debian's packages when running as root.
#
# Every cargo command builds the same features, DuckDB's included: linked to DuckDB's own
# prebuilt library, fetched once from the npm registry (scripts/duckdb-lib.sh), or where that
# cannot be fetched compiled from its bundled C++ sources (some 18 minutes cold on 2 cores, once
# per target folder; .ci/run keeps its target folder in a cache). LOOPSYNC_TEST_DUCKDB=0 leaves
# DuckDB out.
#
# A test that needs a service it does not have fails. LOOPSYNC_SKIP_SERVICES=1 starts no
# service and lets those tests skip instead; the summary then says how many were skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
# The random histories (tests/adversarial.rs, tests/process_faults.rs) take their seed from the
# commit: each commit draws new ones, and a failure in CI replays here.
if [ -z "${LOOPSYNC_HISTORY_COMMIT:-}" ] && commit=$(git rev-parse HEAD 2>/dev/null); then
  export LOOPSYNC_HISTORY_COMMIT=$commit
fi
# Each step says when it starts (seconds into the run): where the time goes.
log() { printf '\n== %s (at %d s)\n' "$*" "$(( $(date +%s) - start ))"; }
as_root() { [ "$(id -u)" -eq 0 ]; }
apt_updated=""
apt_install() {
  as_root || { echo "missing: $* (install it, or run this script as root)" >&2; exit 1; }
  if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

CARGO_DENY_VERSION=0.20.2
NEXTEST_VERSION=0.9.143
logs=$(mktemp -d "${TMPDIR:-/tmp}/loopsync-test-logs.XXXXXX")

features=()
duckdb_build="left out (LOOPSYNC_TEST_DUCKDB=0)"
if [ "${LOOPSYNC_TEST_DUCKDB:-1}" != 0 ]; then
  log "DuckDB"
  duckdb_features=loopsync/duckdb,loopsync-e2e/duckdb,loopsync-warehouse/duckdb,loopsync-testkit/duckdb
  # npm fetches the prebuilt library (the Node tests need it anyway).
  command -v npm >/dev/null || { as_root && apt_install nodejs npm; } || true
  if DUCKDB_LIB_DIR=$(scripts/duckdb-lib.sh); then
    export DUCKDB_LIB_DIR LD_LIBRARY_PATH="$DUCKDB_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    features=(--features "$duckdb_features")
    duckdb_build="linked to DuckDB's prebuilt libduckdb 1.5.6 (npm registry)"
  else
    features=(--features "$duckdb_features,loopsync/duckdb-bundled")
    duckdb_build="compiled from its bundled sources (the prebuilt library could not be fetched)"
  fi
  echo "DuckDB: $duckdb_build"
fi

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

log "cargo-nextest"
# Installed on this machine's kind; elsewhere built once from crates.io and kept outside the clone.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest --version | head -1
else
  nextest_root="${XDG_CACHE_HOME:-$HOME/.cache}/loopsync-test/cargo-nextest-$NEXTEST_VERSION"
  if [ ! -x "$nextest_root/bin/cargo-nextest" ]; then
    CARGO_TARGET_DIR="$nextest_root/build" cargo install --quiet --locked \
      "cargo-nextest@$NEXTEST_VERSION" --root "$nextest_root"
    rm -rf "$nextest_root/build"
  fi
  export PATH="$nextest_root/bin:$PATH"
fi

# The version a NATS server says in its INFO line, for the summary ("" when it cannot be read).
nats_version() {
  python3 - "$1" <<'PY' 2>/dev/null || true
import json, socket, sys, urllib.parse
url = urllib.parse.urlparse(sys.argv[1].split(",")[0])
with socket.create_connection((url.hostname, url.port or 4222), timeout=5) as s:
    line = s.makefile().readline()
print(json.loads(line.split(" ", 1)[1])["version"])
PY
}

# One pass of the Rust tests: every one selected runs, in a process of its own, whatever fails
# (.config/nextest.toml, profile ci); its JUnit file and skip log are kept for the summary.
# Every pass builds the same set (the workspace, the same features), so a later pass compiles
# nothing.
status=0
: >"$logs/passes"
rust_pass() {
  local name=$1 label=$2
  shift 2
  printf '%s\t%s\n' "$name" "$label" >>"$logs/passes"
  # nextest keeps its files under the workspace's target/nextest, whatever CARGO_TARGET_DIR says.
  local junit=target/nextest/ci/junit.xml
  rm -f "$junit"
  LOOPSYNC_SKIP_LOG="$logs/skipped-$name" \
    cargo nextest run --profile ci --workspace "${features[@]}" "$@" 2>&1 | tee -a "$logs/cargo" \
    || status=1
  cp "$junit" "$logs/junit-$name.xml" 2>/dev/null || true
  # Kept after the run, one per pass (the next pass writes junit.xml again): where the time went.
  cp "$junit" "target/nextest/ci/junit-$name.xml" 2>/dev/null || true
}

log "Rust tests (cargo nextest)"
# The NATS TLS test makes its certificates with openssl.
command -v openssl >/dev/null || apt_install openssl
if [ "${LOOPSYNC_SKIP_SERVICES:-}" = 1 ] && [ -z "${LOOPSYNC_TEST_NATS_URL:-}" ]; then
  main_label="without services (LOOPSYNC_SKIP_SERVICES=1)"
else
  main_label="nats-server $(nats_version "${LOOPSYNC_TEST_NATS_URL:-}"), PostgreSQL, MariaDB"
fi
log "build the Rust tests"
cargo nextest run --profile ci --workspace "${features[@]}" --no-run 2>&1 | tail -n 1
log "Rust tests: $main_label"
rust_pass main "$main_label"
# Tests of the warehouse's DuckDB module are not compiled without the feature: named here, so
# the summary lists them as dropped (the end-to-end DuckDB tests note their own drop).
if [ "${LOOPSYNC_TEST_DUCKDB:-1}" = 0 ]; then
  grep -rh -A3 '#\[\(tokio::\)\?test' crates/warehouse/src/duckdb \
    | sed -n 's/.*fn \([a-z0-9_]*\).*/loopsync-warehouse duckdb::\1: not compiled without the duckdb feature (LOOPSYNC_TEST_DUCKDB=0)/p' \
    >"$logs/dropped"
fi

if [ -n "${LOOPSYNC_TEST_NATS_MODERN_URL:-}" ]; then
  log "the NATS tests again, on nats-server $(nats_version "$LOOPSYNC_TEST_NATS_MODERN_URL")"
  LOOPSYNC_TEST_NATS_URL="$LOOPSYNC_TEST_NATS_MODERN_URL" \
    LOOPSYNC_TEST_NATS_BIN="${LOOPSYNC_TEST_NATS_MODERN_BIN:-}" \
    rust_pass modern "nats-server $(nats_version "$LOOPSYNC_TEST_NATS_MODERN_URL") (the NATS tests again)" \
    -E '(package(loopsync-bus) & kind(lib)) | (binary_id(loopsync-e2e::e2e) & test(/^(pipeline|failures|exactly_once|events|operable)::/))'
fi

log "doctests (nextest does not run them)"
cargo test --doc --workspace "${features[@]}" 2>&1 | tee "$logs/doctests" || status=1

log "Node tests (tests/js): Loops JS SDK conformance (loops 6.x and 7.x), compose file"
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
node --test tests/js/*.test.mjs 2>&1 | tee "$logs/node" || status=1

log "Prometheus config and alert rules (deploy/prometheus): promtool"
# Debian's prometheus package ships promtool (the server it also installs is not started).
command -v promtool >/dev/null || apt_install prometheus
promtool_result="config and alert rules checked, their unit tests passed"
{ promtool check config deploy/prometheus/prometheus.yml \
    && (cd deploy/prometheus && promtool test rules alerts.test.yml); } \
  || { status=1; promtool_result="FAILED"; }

log "summary"
python3 scripts/test-summary.py "$logs" || status=1
read -r rust_passed rust_failed rust_skipped <"$logs/rust-totals"
# cargo test --doc: "test result: ok. N passed; N failed; …"; node: "# pass N".
read -r doc_passed doc_failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$logs/doctests")
read -r node_passed node_failed node_skipped < <(awk '/^# pass / { p = $3 } /^# fail / { f = $3 } /^# skipped / { s = $3 } END { print p + 0, f + 0, s + 0 }' "$logs/node")
echo "doctests: $doc_passed passed, $doc_failed failed"
echo "node:  $node_passed tests passed, $node_failed failed, $node_skipped skipped (SDK methods the simulator does not serve)"
echo "cargo deny: sources and bans checked; advisories $advisories"
echo "promtool (deploy/prometheus): $promtool_result"
echo "DuckDB: $duckdb_build"
echo "total: $(( rust_passed + doc_passed + node_passed )) passed, $(( rust_failed + doc_failed + node_failed )) failed, $(( rust_skipped + node_skipped )) skipped or dropped"
echo "in $(( $(date +%s) - start )) s"
[ "$node_failed" -eq 0 ] || status=1
rm -rf "$logs"
exit "$status"
