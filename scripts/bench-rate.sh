#!/usr/bin/env bash
# How much of a Loops team's rate limit loopsync uses, with 1 and with 4 loader workers.
#
#   scripts/bench-rate.sh [SECONDS] [LIMIT]     (defaults: 60 and 10)
#
# For each window the simulator can count a limit by (a sliding second, the strictest reading,
# and a token bucket) and for 1 and 4 loader processes: creates a PostgreSQL database of its own
# (loopsync_bench_rate, dropped at the end) with SECONDS × LIMIT new contacts, starts
# `loopsync sim --rate-limit LIMIT --window W`, the stages as NATS workers (`loopsync worker
# extractor`, `transformer`, and N × `loader`, in their own namespace) and `loopsync run --once
# --remote`, with `requests_per_second = LIMIT`. It reads the simulator's `GET /_sim/stats`:
# every request that reached the API, those answered 429, and the time between the first and
# the last. It prints the requests per second accepted over that time against the limit (the
# baseline: what the team allows), their ratio, and the share of 429s.
#
# Needs: psql, a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else LOOPSYNC_TEST_PG_URL: a URL whose
# user may create databases), a NATS server with JetStream (LOOPSYNC_BENCH_NATS_URL, else
# LOOPSYNC_TEST_NATS_URL), python3. LOOPSYNC_BIN names the binary; else the release build is made
# (cargo build --release -p loopsync) and used.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
limit=${2:-10}
db=loopsync_bench_rate
# pg_url, bin, bench_url and work (see the file).
. scripts/bench-lib.sh
nats_url=${LOOPSYNC_BENCH_NATS_URL:-${LOOPSYNC_TEST_NATS_URL:-}}
if [ -z "$nats_url" ]; then
  echo "set LOOPSYNC_BENCH_NATS_URL (or LOOPSYNC_TEST_NATS_URL) to a NATS server with JetStream" >&2
  exit 2
fi
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  pids=()
}
cleanup() {
  stop_all
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

rows=$((seconds * limit))

# One case: sets the figures of the table's row.
measure() {
  local window=$1 loaders=$2 case=$1-$2
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  psql -q "$bench_url" >/dev/null <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, email text, first_name text);
INSERT INTO users SELECT i, 'user' || i || '@example.com', 'First' || i
FROM generate_series(1, $rows) AS i;
SQL
  start_sim --rate-limit "$limit" --window "$window"
  pids+=("$sim_pid")
  local sim_url=${sim_api%/api}
  local cfg=$work/$case.toml
  cat >"$cfg" <<TOML
[warehouse]
url = "$bench_url"

[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = $limit

[nats]
url = "$nats_url"
namespace = "bench_rate_$$_${window//-/_}_$loaders"

[[sync]]
name = "users"
model = "select id, email, first_name from users"
primary_key = "id"
identify_by = "email"
behavior = "upsert"

[sync.mapping]
email = "email"
firstName = "first_name"
TOML
  local stage
  for stage in extractor transformer; do
    "$bin" worker "$stage" --config "$cfg" >"$work/$case-$stage.log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq "$loaders"); do
    "$bin" worker loader --config "$cfg" >"$work/$case-loader$i.log" 2>&1 &
    pids+=($!)
  done
  sleep 1
  "$bin" run --once --remote --config "$cfg" >"$work/$case-run.out" 2>&1 \
    || { echo "the run failed:" >&2; cat "$work/$case-run.out" >&2; exit 1; }
  curl -s "$sim_url/_sim/stats" >"$work/$case-stats.json"
  stop_all
  read -r total limited span < <(python3 -c '
import json, sys
from datetime import datetime
s = json.load(open(sys.argv[1]))
t = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
print(s["total_requests"], s["rate_limited"], t(s["last_request_at"]) - t(s["first_request_at"]))
' "$work/$case-stats.json")
  accepted=$((total - limited))
  # n requests evenly spaced at the limit span (n - 1) / limit seconds.
  per_second=$(calc "($accepted - 1) / $span" 3)
  printf '%-13s %7s %9s %6s %7s %8s %11s %7s %7s\n' "$window" "$loaders" "$total" "$limited" \
    "$(calc "100 * $limited / $total" 2)" "$(calc "$span" 1)" "$per_second" "$limit" \
    "$(calc "100 * $per_second / $limit" 1)"
}

echo "rate budget: $rows new contacts per case, limit $limit/s, requests_per_second = $limit"
printf '%-13s %7s %9s %6s %7s %8s %11s %7s %7s\n' window loaders requests 429s "429 %" \
  "span s" "accepted/s" limit "used %"
for window in sliding token-bucket; do
  for loaders in 1 4; do
    measure "$window" "$loaders"
  done
done
