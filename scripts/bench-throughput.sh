#!/usr/bin/env bash
# How fast one process takes new contacts into Loops when Loops' limit is not what limits it.
#
#   scripts/bench-throughput.sh [ROWS] [CONCURRENCY]     (defaults: 50000 and 32)
#
# Creates a PostgreSQL database of its own (loopsync_bench_throughput, dropped at the end) with a
# `users` table of ROWS new rows, starts the simulator with no effective limit
# (`loopsync sim --rate-limit 1000000`) and runs `loopsync run --once` in one process (no NATS)
# with `requests_per_second = 1000000` and `concurrency = CONCURRENCY`. It prints the run's wall
# time, contacts confirmed per second, the time to the end of extraction (`loopsync runs`:
# the run is past `extracting`), the run's peak RSS, and the ratio to the goal of 5 000
# contacts/s. The simulator's own CPU time is printed beside it: it shares the machine.
#
# With LOOPSYNC_BENCH_NATS_URL set (a NATS server with JetStream), the run's stages talk over
# NATS JetStream instead (`[nats]`, a namespace of its own), still in one process; the time to
# the end of extraction then measures the extractor publishing every change to JetStream while
# the transformer consumes them and publishes the operations. Give it a nats-server of its own:
# on the server the test suite had used (its streams and stores left behind) a run made 810–840
# contacts/s, on a fresh one 1 700–2 100/s, the same binary on the same machine.
#
# Needs: psql, /usr/bin/time (GNU), a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else
# LOOPSYNC_TEST_PG_URL: a URL whose user may create databases), Linux (/proc). LOOPSYNC_BIN names
# the binary; else the release build is made (cargo build --release -p loopsync) and used.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-50000}
concurrency=${2:-32}
goal=5000
db=loopsync_bench_throughput
# pg_url, bin, bench_url and work (see the file).
. scripts/bench-lib.sh
sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && { kill -KILL "$sim_pid" 2>/dev/null; wait "$sim_pid" 2>/dev/null; } || true
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
psql -q "$bench_url" >/dev/null <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, email text, first_name text, plan text, seats int);
INSERT INTO users
SELECT i, 'user' || i || '@example.com', 'First' || i, (ARRAY['free','pro','team'])[1 + i % 3],
       1 + i % 50
FROM generate_series(1, $rows) AS i;
ANALYZE users;
SQL
start_sim --rate-limit 1000000
cfg=$work/loopsync.toml
cat >"$cfg" <<TOML
[warehouse]
url = "$bench_url"

[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = 1000000
concurrency = $concurrency

[[sync]]
name = "users"
model = "select id, email, first_name, plan, seats from users"
primary_key = "id"
identify_by = "email"
behavior = "upsert"

[sync.mapping]
email = "email"
firstName = "first_name"
planName = "plan"
seats = { column = "seats", type = "number" }
TOML
nats_url=${LOOPSYNC_BENCH_NATS_URL:-}
if [ -n "$nats_url" ]; then
  cat >>"$cfg" <<TOML

[nats]
url = "$nats_url"
namespace = "bench_throughput_$$"
TOML
fi

started=$(now)
/usr/bin/time -f '%M' -o "$work/rss" "$bin" run --once --json --config "$cfg" >"$work/run.json" 2>"$work/run.err" &
run_pid=$!
extracted=""
while kill -0 "$run_pid" 2>/dev/null; do
  if [ -z "$extracted" ]; then
    status=$("$bin" runs --json --limit 1 --config "$cfg" 2>/dev/null \
      | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]; print(r[0]["status"] if r else "")' \
      2>/dev/null || true)
    case "$status" in
      sending | succeeded | degraded | failed) extracted=$(calc "$(now) - $started" 2) ;;
    esac
  fi
  sleep 0.2
done
wait "$run_pid" || { cat "$work/run.err" >&2; exit 1; }
secs=$(calc "$(now) - $started" 2)
confirmed=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["data"]
r = r[0] if isinstance(r, list) else r
print(r.get("confirmed", r.get("summary", {}).get("confirmed", 0)))' "$work/run.json")
sim_cpu=$(awk '{ print ($14 + $15) / 100 }' "/proc/$sim_pid/stat")
sim_url=${sim_api%/api}
requests=$(curl -s "$sim_url/_sim/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["by_endpoint"].get("PUT /v1/contacts/update", {}).get("200", 0))')
rate=$(calc "$confirmed / $secs" 0)
echo "first sync of $rows new contacts in one process${nats_url:+ over NATS JetStream}, simulator without a limit, concurrency $concurrency:"
echo "  run --once: $secs s wall, $confirmed confirmed ($requests contact writes answered 200), extraction done at ${extracted:-?} s"
echo "  contacts/s: $rate; goal $goal/s; ratio $(calc "$rate / $goal" 2)x"
[ -n "$extracted" ] && echo "  changes extracted (and published) per second: $(calc "$rows / $extracted" 0)"
echo "  run peak RSS: $(calc "$(cat "$work/rss") / 1024") MiB; simulator CPU: $sim_cpu s"
