#!/usr/bin/env bash
# Peak memory of a first sync in one process (no NATS), at 10 requests/s.
#
#   scripts/bench-memory.sh [ROWS] [BASELINE_ROWS]     (defaults: 1000000 and 100000)
#
# For BASELINE_ROWS, then ROWS: creates a PostgreSQL database of its own (loopsync_bench_memory,
# dropped at the end) with a `users` table of that many new rows, starts the simulator
# (`loopsync sim`, rate limit 10/s) and `loopsync run --once` at requests_per_second = 10 without
# [nats], and samples the run's RSS (/proc/PID/status) until the run is past `extracting`
# (`loopsync runs --json` says `sending`: a neighbour command, its slowest answer reported): the end of extraction. Then it stops the run (SIGTERM,
# SIGKILL after 15 s) and measures `loopsync plan --json` on the same rows. It prints rows,
# extraction wall time, peak RSS (VmHWM), and the growth per record between the two sizes.
#
# Needs: psql, a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else LOOPSYNC_TEST_PG_URL: a URL whose
# user may create databases), Linux (/proc). LOOPSYNC_BIN names the binary; else the release
# build is made (cargo build --release -p loopsync) and used.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-1000000}
baseline=${2:-100000}
db=loopsync_bench_memory
# pg_url, bin, bench_url and work (see the file).
. scripts/bench-lib.sh
sim_pid=""
run_pid=""
cleanup() {
  for pid in $run_pid $sim_pid; do kill -KILL "$pid" 2>/dev/null || true; done
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

kb() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

# One size: sets secs (extraction wall time), peak and plan_peak (KiB).
measure() {
  local n=$1
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  psql -q "$bench_url" >/dev/null <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, email text, first_name text, plan text,
                    seats int, newsletter boolean, signed_up_at timestamptz);
INSERT INTO users
SELECT i, 'user' || i || '@example.com', 'First' || i, (ARRAY['free','pro','team'])[1 + i % 3],
       1 + i % 50, i % 2 = 0, timestamptz '2024-01-01' + i * interval '1 minute'
FROM generate_series(1, $n) AS i;
ANALYZE users;
SQL
  start_sim --rate-limit 10 --list cm_news=Newsletter
  cat >"$work/loopsync.toml" <<TOML
[warehouse]
url = "$bench_url"

[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = 10

[[sync]]
name = "users"
model = "select id, email, first_name, plan, seats, newsletter, signed_up_at from users"
primary_key = "id"
identify_by = "email"
behavior = "upsert"

[sync.mapping]
email = "email"
firstName = "first_name"
planName = "plan"
seats = { column = "seats", type = "number" }
signedUpAt = { column = "signed_up_at", type = "date" }

[sync.mailing_lists]
"cm_news" = "newsletter"
TOML
  local cfg=$work/loopsync.toml

  # plan --json, to /dev/null: its peak.
  "$bin" plan --json --config "$cfg" >/dev/null &
  local plan_pid=$! hwm
  plan_peak=0
  while kill -0 "$plan_pid" 2>/dev/null; do
    hwm=$(kb "$plan_pid" VmHWM)
    [ -n "$hwm" ] && plan_peak=$hwm
    sleep 0.1
  done
  wait "$plan_pid"

  local started ended status=""
  peak=0
  runs_slowest=0
  started=$(date +%s.%N)
  "$bin" run --once --config "$cfg" >"$work/run.out" 2>"$work/run.err" &
  run_pid=$!
  while :; do
    if ! kill -0 "$run_pid" 2>/dev/null; then
      echo "the run ended before its extraction did:" >&2
      cat "$work/run.err" >&2
      exit 1
    fi
    hwm=$(kb "$run_pid" VmHWM)
    [ -n "$hwm" ] && peak=$hwm
    # What `loopsync runs` shows: a neighbour command beside the run, timed.
    local asked answered
    asked=$(date +%s.%N)
    status=$("$bin" runs --json --limit 1 --config "$cfg" 2>/dev/null \
      | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]; print(r[0]["status"] if r else "")' \
      2>/dev/null || true)
    answered=$(calc "$(date +%s.%N) - $asked")
    if [ "$(calc "($answered > $runs_slowest)" 0)" = 1 ]; then runs_slowest=$answered; fi
    case "$status" in
      "" | requested | extracting) sleep 0.5 ;;
      *) break ;;
    esac
  done
  ended=$(date +%s.%N)
  hwm=$(kb "$run_pid" VmHWM)
  [ -n "$hwm" ] && peak=$hwm
  local signalled
  signalled=$(date +%s.%N)
  kill -TERM "$run_pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$run_pid" 2>/dev/null || break; sleep 0.1; done
  stop_secs=$(calc "$(date +%s.%N) - $signalled")
  kill -KILL "$run_pid" 2>/dev/null || true
  wait "$run_pid" 2>/dev/null || true
  run_pid=""
  kill -TERM "$sim_pid" 2>/dev/null || true
  wait "$sim_pid" 2>/dev/null || true
  sim_pid=""
  secs=$(calc "$ended - $started")
}

echo "first sync in one process at 10 requests/s: peak RSS up to the end of extraction" >&2
printf '%-10s %12s %14s %14s %14s %10s\n' rows "extract s" "run peak MiB" "plan peak MiB" "runs slowest s" "SIGTERM s"
measure "$baseline"
b_secs=$secs b_peak=$peak b_plan=$plan_peak
printf '%-10s %12s %14s %14s %14s %10s\n' "$baseline" "$secs" "$(calc "$peak / 1024")" "$(calc "$plan_peak / 1024")" "$(calc "$runs_slowest" 2)" "$(calc "$stop_secs" 2)"
measure "$rows"
printf '%-10s %12s %14s %14s %14s %10s\n' "$rows" "$secs" "$(calc "$peak / 1024")" "$(calc "$plan_peak / 1024")" "$(calc "$runs_slowest" 2)" "$(calc "$stop_secs" 2)"
if [ "$rows" -ne "$baseline" ]; then
  echo "rows ratio: $(calc "$rows / $baseline")x; run peak ratio: $(calc "$peak / $b_peak" 2)x; plan peak ratio: $(calc "$plan_peak / $b_plan" 2)x; extraction time ratio: $(calc "$secs / $b_secs" 2)x"
  echo "growth per record: run $(calc "($peak - $b_peak) * 1024 / ($rows - $baseline)") bytes, plan $(calc "($plan_peak - $b_plan) * 1024 / ($rows - $baseline)") bytes"
fi
