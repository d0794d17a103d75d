#!/usr/bin/env bash
# Event syncs: requests per event, and the read cost of a run with and without the cursor.
#
#   scripts/bench-events.sh [ROWS] [NEW_ROWS]     (defaults: 1000000 and 1000)
#
# Creates a PostgreSQL database of its own (loopsync_bench_events, dropped at the end) with a
# `user_events` table of ROWS rows (5 000 emails, 5 event names, occurred_at spread over the 30
# days before now, an index on occurred_at) and two event syncs of it (`behavior = "append"`),
# each in its own config: `ev_cursor` (cursor = "occurred_at", cursor_lookback = "1h") and
# `ev_full` (no cursor). Starts the simulator (`loopsync sim`, a high rate limit) and, without
# [nats]:
#
# 1. `loopsync adopt` of both syncs (start from now: every row marked sent, the watermark set);
# 2. inserts NEW_ROWS rows with occurred_at = now();
# 3. for each sync, 3 times: the wall time of `loopsync plan --json --sync X` (the read a run
#    would do), the model rows it read (its counts: added + changed + unchanged + invalid_rows +
#    ignored), and PostgreSQL's reads of user_events and loopsync.state during it (deltas of
#    pg_stat_user_tables: seq_tup_read + idx_tup_fetch; of pg_statio_user_tables: heap blocks
#    hit + read);
# 4. for each sync, `loopsync run --once --json`: its wall time, events confirmed, and the
#    simulator's `POST /v1/events/send` requests during it (GET /_sim/stats) per event
#    confirmed; then a second run, which must send nothing.
#
# It prints each measurement (min and median of the 3) and a summary table.
#
# Needs: psql, python3, curl, a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else LOOPSYNC_TEST_PG_URL: a
# URL whose user may create databases) whose statistics collector is on (track_counts, the
# default). LOOPSYNC_BIN names the binary; else the release build is made
# (cargo build --release -p loopsync) and used.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-1000000}
new_rows=${2:-1000}
repeats=3
db=loopsync_bench_events
# pg_url, bin, bench_url and work (see the file).
. scripts/bench-lib.sh
sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && kill -KILL "$sim_pid" 2>/dev/null || true
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# min and median of the numbers given.
min_median() {
  python3 -c 'import statistics, sys; v = [float(x) for x in sys.argv[1:]]; print(f"{min(v):.12g} {statistics.median(v):.12g}")' "$@"
}

echo "building $rows rows (+ $new_rows new) in $db" >&2
psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
build_started=$(now)
psql -q -v ON_ERROR_STOP=1 "$bench_url" >/dev/null <<SQL
CREATE TABLE user_events (event_id bigint PRIMARY KEY, email text, event_name text, plan text,
                          amount numeric, occurred_at timestamptz);
INSERT INTO user_events
SELECT i, 'user' || (i % 5000) || '@example.com',
       (ARRAY['signup', 'login', 'viewedPricing', 'invoicePaid', 'cancelled'])[1 + i % 5],
       (ARRAY['free', 'pro', 'team'])[1 + i % 3],
       round((i % 10000) / 100.0, 2),
       -- 30 days before now, the last row a minute before now.
       now() - interval '1 minute' - ($rows - i) * (interval '30 days' / $rows)
FROM generate_series(1, $rows) AS i;
CREATE INDEX user_events_occurred_at ON user_events (occurred_at);
ANALYZE user_events;
SQL
echo "data built in $(calc "$(now) - $build_started") s" >&2

start_sim --rate-limit 100000
sim_root=${sim_api%/api}

# config SYNC [CURSOR LINES]: one config of one event sync of user_events.
config() {
  cat >"$work/$1.toml" <<TOML
[warehouse]
url = "$bench_url"

[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = 1000

[[sync]]
name = "$1"
model = "select event_id, email, event_name, plan, amount, occurred_at from user_events"
primary_key = "event_id"
identify_by = "email"
behavior = "append"
event = { column = "event_name" }
${2:-}

[sync.mapping]
email = "email"

[sync.event_properties]
plan = "plan"
amount = { column = "amount", type = "number" }
TOML
}
config ev_cursor $'cursor = "occurred_at"\ncursor_lookback = "1h"'
config ev_full
syncs="ev_cursor ev_full"

for sync in $syncs; do
  started=$(now)
  "$bin" adopt --json --sync "$sync" --config "$work/$sync.toml" >"$work/adopt-$sync.json"
  echo "adopt $sync: $(calc "$(now) - $started") s" >&2
done

psql -q -v ON_ERROR_STOP=1 "$bench_url" >/dev/null <<SQL
INSERT INTO user_events
SELECT i, 'user' || (i % 5000) || '@example.com', 'invoicePaid', 'pro', 12.5, now()
FROM generate_series($rows + 1, $rows + $new_rows) AS i;
ANALYZE user_events;
SQL

# Reads of a table so far: tuples (sequential + fetched by an index) and heap blocks (hit + read).
reads() {
  psql -qAt -F ' ' "$bench_url" -c "
    SELECT coalesce(t.seq_tup_read, 0) + coalesce(t.idx_tup_fetch, 0),
           coalesce(io.heap_blks_hit, 0) + coalesce(io.heap_blks_read, 0)
      FROM pg_stat_user_tables t JOIN pg_statio_user_tables io USING (relid)
     WHERE t.relid = '$1'::regclass"
}
# Both tables, after the backends of the command measured have reported theirs (a backend
# reports when it ends; give it a moment).
all_reads() {
  sleep 1
  echo "$(reads user_events) $(reads loopsync.state)"
}

# plan_counts FILE: model rows read (added + changed + unchanged + invalid_rows + ignored),
# and the records planned to be sent.
plan_counts() {
  python3 - "$1" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))["data"][0]
c = plan["counts"]
print(c["added"] + c["changed"] + c["unchanged"] + c["invalid_rows"] + c["ignored"], plan["requests"])
PY
}

declare -A plan_median plan_min read_rows ev_tup ev_blk st_tup
echo
echo "loopsync plan --json --sync X, $repeats times each ($((rows + new_rows)) rows in user_events, $new_rows new)"
printf '%-10s %4s %9s %10s %9s %14s %14s %14s\n' sync try "wall s" "rows read" requests \
  "events tuples" "events blocks" "state tuples"
for sync in $syncs; do
  times=()
  tups=() blks=() stups=()
  for try in $(seq "$repeats"); do
    read -r t0 b0 s0 _ < <(all_reads)
    started=$(now)
    "$bin" plan --json --sync "$sync" --config "$work/$sync.toml" >"$work/plan-$sync.json"
    secs=$(calc "$(now) - $started" 3)
    read -r t1 b1 s1 _ < <(all_reads)
    read -r n_read n_requests < <(plan_counts "$work/plan-$sync.json")
    times+=("$secs") tups+=($((t1 - t0))) blks+=($((b1 - b0))) stups+=($((s1 - s0)))
    printf '%-10s %4s %9s %10s %9s %14s %14s %14s\n' "$sync" "$try" "$secs" "$n_read" "$n_requests" \
      $((t1 - t0)) $((b1 - b0)) $((s1 - s0))
  done
  read -r mn md < <(min_median "${times[@]}")
  plan_min[$sync]=$mn plan_median[$sync]=$md read_rows[$sync]=$n_read
  read -r _ ev_tup[$sync] < <(min_median "${tups[@]}")
  read -r _ ev_blk[$sync] < <(min_median "${blks[@]}")
  read -r _ st_tup[$sync] < <(min_median "${stups[@]}")
  echo "$sync plan wall time: min $mn s, median $md s"
done

# Requests to POST /v1/events/send the simulator has seen, whatever its answer.
sim_event_requests() {
  curl -fsS "$sim_root/_sim/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(sum(s.get("by_endpoint", {}).get("POST /v1/events/send", {}).values()))'
}

echo
echo "loopsync run --once --json --sync X (the $new_rows new rows sent to the simulator), then again"
printf '%-10s %4s %9s %10s %10s %14s %12s %10s\n' sync run "wall s" "rows read" confirmed \
  "sim requests" "req/event" "requests"
declare -A run_secs per_event
for sync in $syncs; do
  for pass in 1 2; do
    before=$(sim_event_requests)
    started=$(now)
    "$bin" run --once --json --sync "$sync" --config "$work/$sync.toml" >"$work/run-$sync.json"
    secs=$(calc "$(now) - $started" 3)
    sent=$(($(sim_event_requests) - before))
    read -r status n_read confirmed requests < <(python3 - "$work/run-$sync.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["data"][0]
print(r["status"], r["added"] + r["changed"] + r["unchanged"] + r["invalid_rows"] + r["ignored"],
      r["confirmed"], r["requests"])
PY
)
    if [ "$confirmed" -gt 0 ]; then ratio=$(calc "$sent / $confirmed" 3); else ratio="-"; fi
    printf '%-10s %4s %9s %10s %10s %14s %12s %10s\n' "$sync" "$pass" "$secs" "$n_read" \
      "$confirmed" "$sent" "$ratio" "$requests"
    if [ "$status" != succeeded ]; then
      echo "run $pass of $sync ended $status:" >&2
      cat "$work/run-$sync.json" >&2
      exit 1
    fi
    if [ "$pass" = 1 ]; then
      run_secs[$sync]=$secs per_event[$sync]=$ratio
      if [ "$confirmed" -ne "$new_rows" ]; then
        echo "warning: $sync confirmed $confirmed events, not $new_rows" >&2
      fi
    elif [ "$sent" -ne 0 ]; then
      echo "warning: the rerun of $sync sent $sent events" >&2
    fi
  done
done

echo
echo "summary ($((rows + new_rows)) rows in user_events, $new_rows new since adopt; medians of $repeats)"
printf '%-10s %12s %10s %12s %14s %14s %14s %11s %10s\n' sync "table rows" "rows read" "plan wall s" \
  "events tuples" "events blocks" "state tuples" "run wall s" "req/event"
for sync in $syncs; do
  printf '%-10s %12s %10s %12s %14s %14s %14s %11s %10s\n' "$sync" $((rows + new_rows)) "${read_rows[$sync]}" \
    "${plan_median[$sync]}" "${ev_tup[$sync]}" "${ev_blk[$sync]}" "${st_tup[$sync]}" "${run_secs[$sync]}" \
    "${per_event[$sync]}"
done
echo "ratio full/cursor: rows read $(calc "${read_rows[ev_full]} / ${read_rows[ev_cursor]}")x," \
  "plan wall time $(calc "${plan_median[ev_full]} / ${plan_median[ev_cursor]}")x," \
  "user_events tuples $(calc "${ev_tup[ev_full]} / (${ev_tup[ev_cursor]} > 0 ? ${ev_tup[ev_cursor]} : 1)")x"
kill -TERM "$sim_pid" 2>/dev/null || true
wait "$sim_pid" 2>/dev/null || true
sim_pid=""
