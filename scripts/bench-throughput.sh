#!/usr/bin/env bash
# How fast one process takes new contacts into Loops when Loops' limit is not what limits it.
#
#   scripts/bench-throughput.sh [ROWS] [CONCURRENCY]     (defaults: 50000 and 32)
#
# Creates a PostgreSQL database of its own (loopsync_bench_throughput, dropped at the end) with a
# `users` table of ROWS new rows, starts the simulator with no effective limit
# (`loopsync sim --rate-limit 1000000`), then two passes, each a first sync of those rows by
# `loopsync run --once` in one process (no NATS), `concurrency = CONCURRENCY`:
#
# 1. End to end, `requests_per_second = 1000000`: the run's wall time, contacts confirmed per
#    second and the ratio to the goal of 5 000/s, when the extraction ended (`loopsync runs`: the
#    run is past `extracting`, read every 200 ms) and when the transformer had published every
#    operation (the run's Prometheus counter, read every 50 ms), the run's peak RSS.
# 2. The extractor and the transformer alone: the same rows as a second new sync, with the loader
#    held to one request a second; the run is stopped once the transformer published every
#    operation. Changes per second, and the ratio to the goal of 50 000/s.
#
# Each pass prints the CPU seconds of the run, the simulator and every nats-server and postgres
# process of this machine (they share its cores), and their sum per 1 000 records: what a pass
# costs the machine, whatever it waits on.
#
# With LOOPSYNC_BENCH_NATS_URL set (a NATS server with JetStream), the run's stages talk over
# NATS JetStream instead (`[nats]`, a namespace of its own per pass), still in one process.
# Give it a nats-server of its own: on the server the test suite had used (its streams and
# stores left behind) a run made 810–840 contacts/s, on a fresh one 1 700–2 100/s, the same
# binary on the same machine.
#
# Needs: psql, /usr/bin/time (GNU), a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else
# LOOPSYNC_TEST_PG_URL: a URL whose user may create databases), Linux (/proc). LOOPSYNC_BIN names
# the binary; else the release build is made (cargo build --release -p loopsync) and used.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-50000}
concurrency=${2:-32}
goal=5000
transformer_goal=50000
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
nats_url=${LOOPSYNC_BENCH_NATS_URL:-}

# config NAME RPS: a config of one sync NAME of the `users` table, at RPS requests/s.
config() {
  cat <<TOML
[warehouse]
url = "$bench_url"

[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = $2
concurrency = $concurrency

[[sync]]
name = "$1"
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
  if [ -n "$nats_url" ]; then
    printf '\n[nats]\nurl = "%s"\nnamespace = "bench_throughput_%s_%s"\n' "$nats_url" "$$" "$1"
  fi
}

# CPU seconds used so far by every live process of this machine named $1 (nats-server,
# postgres), with their children that ended (a PostgreSQL connection's process ends with it).
# A process that ended and is not reaped yet (state Z) is left out: it may be gone by the next
# reading.
cpu_of() {
  local total=0 pid
  for pid in $(pgrep -x "$1" 2>/dev/null); do
    total=$(awk -v t="$total" '{ print t + ($3 == "Z" ? 0 : ($14 + $15 + $16 + $17) / 100) }' "/proc/$pid/stat" 2>/dev/null || echo "$total")
  done
  echo "$total"
}

# The run's Prometheus endpoint, on a free port: the transformer's count of operations.
metrics_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
transformed_count() {
  curl -s "http://127.0.0.1:$metrics_port/metrics" \
    | awk '/^loopsync_records_total/ && /stage="transformer"/ && /outcome="operation"/ { n += $NF } END { print n + 0 }'
}

# bench_sync NAME RPS [stop]: `loopsync run --once` of a new sync NAME at RPS requests/s; sets secs,
# extracted (the run is past `extracting`, by `loopsync runs`), transformed (the transformer
# published its ROWS-th operation, by the run's metrics) and the CPU seconds of the run, the
# machine's nats-server and postgres processes. With `stop`, the run is stopped (SIGTERM) once
# every operation is published.
bench_sync() {
  local cfg=$work/$1.toml
  config "$1" "$2" >"$cfg"
  local nats0 pg0 sim0
  nats0=$(cpu_of nats-server) pg0=$(cpu_of postgres) sim0=$(awk '{ print ($14 + $15) / 100 }' "/proc/$sim_pid/stat")
  started=$(now)
  /usr/bin/time -f '%M %U %S' -o "$work/$1.rss" "$bin" run --once --json --config "$cfg" \
    --metrics-addr "127.0.0.1:$metrics_port" >"$work/$1.json" 2>"$work/$1.err" &
  local run_pid=$! polls=0 status
  extracted="" transformed=""
  # The metrics every 50 ms; the run's status (a process of its own, and queries) every 200 ms.
  while kill -0 "$run_pid" 2>/dev/null; do
    polls=$((polls + 1))
    if [ -z "$transformed" ] && [ "$(transformed_count 2>/dev/null || echo 0)" -ge "$rows" ]; then
      transformed=$(calc "$(now) - $started" 2)
      # (The run is the child of /usr/bin/time, which writes its figures when it ends.)
      [ "${3:-}" = stop ] && pkill -TERM -P "$run_pid"
    fi
    if [ -z "$extracted" ] && [ $((polls % 4)) = 1 ]; then
      status=$("$bin" runs --json --sync "$1" --limit 1 --config "$cfg" 2>/dev/null \
        | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]; print(r[0]["status"] if r else "")' \
        2>/dev/null || true)
      case "$status" in
        sending | succeeded | degraded | failed) extracted=$(calc "$(now) - $started" 2) ;;
      esac
    fi
    sleep 0.05
  done
  if ! wait "$run_pid" && [ "${3:-}" != stop ]; then
    cat "$work/$1.err" >&2
    exit 1
  fi
  secs=$(calc "$(now) - $started" 2)
  # (A run that was stopped has a line about its exit status first.)
  read -r rss user sys < <(tail -n 1 "$work/$1.rss")
  run_cpu=$(calc "$user + $sys" 2)
  nats_cpu=$(calc "$(cpu_of nats-server) - $nats0" 2)
  pg_cpu=$(calc "$(cpu_of postgres) - $pg0" 2)
  sim_cpu=$(calc "$(awk '{ print ($14 + $15) / 100 }' "/proc/$sim_pid/stat") - $sim0" 2)
}

cpu_line() {
  echo "  CPU seconds: the run $run_cpu, simulator $sim_cpu, this machine's nats-server $nats_cpu and postgres $pg_cpu; per 1 000 records $(calc "($run_cpu + $sim_cpu + $nats_cpu + $pg_cpu) * 1000 / $rows" 2) s"
}

bench_sync users 1000000
confirmed=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["data"]
r = r[0] if isinstance(r, list) else r
print(r.get("confirmed", r.get("summary", {}).get("confirmed", 0)))' "$work/users.json")
sim_url=${sim_api%/api}
requests=$(curl -s "$sim_url/_sim/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["by_endpoint"].get("PUT /v1/contacts/update", {}).get("200", 0))')
rate=$(calc "$confirmed / $secs" 0)
echo "first sync of $rows new contacts in one process${nats_url:+ over NATS JetStream}, simulator without a limit, concurrency $concurrency:"
echo "  run --once: $secs s wall, $confirmed confirmed ($requests contact writes answered 200), extraction done at ${extracted:-?} s, every operation published at ${transformed:-?} s"
echo "  contacts/s: $rate; goal $goal/s; ratio $(calc "$rate / $goal" 2)x"
echo "  run peak RSS: $(calc "$rss / 1024") MiB"
cpu_line

# The extractor and the transformer alone: the same rows as a second new sync, the loader held
# to one request a second, the run stopped once the transformer published every operation.
bench_sync users_extract 1 stop
echo "the same rows through the extractor and the transformer, the loader held to 1 request/s:"
echo "  every operation published at $transformed s (extraction done at ${extracted:-?} s)"
echo "  changes/s: $(calc "$rows / $transformed" 0); goal $transformer_goal/s; ratio $(calc "$rows / $transformed / $transformer_goal" 2)x"
cpu_line
