#!/usr/bin/env bash
# The diff of a contact sync against a Census-style baseline, measured in the same run.
#
#   scripts/bench-diff.sh [ROWS]     (default: 1000000)
#
# Creates a PostgreSQL database of its own (loopsync_bench_diff, dropped at the end) with a
# `users` table of ROWS rows (8 columns), a mirror sync of it (7 mapped columns), starts the
# simulator (`loopsync sim`) and runs `loopsync adopt` (every row marked as in Loops). It keeps a
# snapshot for the baseline, `snap (id, md5(row::text))` with a primary key, as of the same
# moment. Then it changes 1 % of the rows, deletes 0.5 % and inserts 0.5 % new ones, and times,
# three times each, alternating:
#   ours      `loopsync plan --json` (a run's read: the diff, the decisions, the plan), wall
#             time of the whole command, and its peak RSS (/usr/bin/time's maximum resident set);
#   baseline  the changed, new and removed rows by `md5(u::text)` FULL OUTER JOIN against the
#             snapshot, copied out to the client (`psql … COPY (…) TO STDOUT`, to /dev/null).
# It prints the medians, the ratio and our peak RSS, and checks the plan's counts against the
# changes made.
#
# With a cursor: the table has an `updated_at` (indexed; the changes set it to now()), and a
# second sync of it, `users_cursor`, the same but for `cursor = "updated_at"` (the default 1h
# lookback), is adopted beside the first and run once (its full diff, nothing to send): its
# `plan` diffs incrementally (the rows whose cursor moved, those the state has not noted, and
# every row sharing a key or an email with one read out), timed three times against two
# baselines — the
# same md5 FULL OUTER JOIN, and the least any cursor-based tool reads, the rows at or after the
# watermark minus the lookback copied out (`COPY (SELECT * … WHERE updated_at >= …)`).
#
# Then, after `VACUUM ANALYZE loopsync.state` (what autovacuum does between scheduled runs; a
# server with autovacuum off never does it), both plans three times again; and one `plan` of
# users_cursor with every key unnoted, as after a first send of every row (its incremental diff
# reads every row, by key).
#
# LOOPSYNC_BENCH_KEEP=1 keeps the database at the end, to look into (EXPLAIN ANALYZE).
#
# Needs: psql, /usr/bin/time (GNU), a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else
# LOOPSYNC_TEST_PG_URL: a URL whose user may create databases). LOOPSYNC_BIN names the binary;
# else the release build is made (cargo build --release -p loopsync) and used.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-1000000}
db=loopsync_bench_diff
# pg_url, bin, bench_url and work (see the file).
. scripts/bench-lib.sh
sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && kill -KILL "$sim_pid" 2>/dev/null || true
  # Then, after `VACUUM ANALYZE loopsync.state` (what autovacuum does between scheduled runs; a
# server with autovacuum off never does it), both plans three times again; and one `plan` of
# users_cursor with every key unnoted, as after a first send of every row (its incremental diff
# reads every row, by key).
#
# LOOPSYNC_BENCH_KEEP=1 keeps the database (and prints its URL), to EXPLAIN the diffs.
  if [ -n "${LOOPSYNC_BENCH_KEEP:-}" ]; then
    echo "kept: $bench_url" >&2
  else
    psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

changed=$((rows / 100))
removed=$((rows / 200))
added=$((rows / 200))

echo "building $rows rows…" >&2
make_pg_users "$rows"

psql -q "$bench_url" >/dev/null <<SQL
ALTER TABLE users ADD COLUMN updated_at timestamptz;
UPDATE users SET updated_at = timestamptz '2024-01-01' + id * interval '1 second';
CREATE INDEX users_updated_at ON users (updated_at);
VACUUM ANALYZE users;
SQL

start_sim --list cm_news=Newsletter

cfg=$work/loopsync.toml
{
  printf '[warehouse]\nurl = "%s"\n\n' "$bench_url"
  users_mirror_config
  # The same sync, with a cursor.
  users_mirror_config | sed -n '/^\[\[sync\]\]/,$p' \
    | sed -e 's/^name = "users"/name = "users_cursor"/' \
      -e 's/ signed_up_at from users"/ signed_up_at, updated_at from users"/' \
      -e 's/^behavior = "mirror"/behavior = "mirror"\ncursor = "updated_at"/'
} >"$cfg"

started=$(now)
"$bin" adopt --sync users --config "$cfg" >"$work/adopt.out" 2>&1 \
  || { cat "$work/adopt.out" >&2; exit 1; }
adopt_secs=$(calc "$(now) - $started" 2)
"$bin" adopt --sync users_cursor --config "$cfg" >"$work/adopt-cursor.out" 2>&1 \
  || { cat "$work/adopt-cursor.out" >&2; exit 1; }
# An adoption is no full diff (one from Loops' export leaves rows out): a first run makes one,
# sending nothing.
"$bin" run --once --sync users_cursor --config "$cfg" >"$work/run-cursor.out" 2>&1 \
  || { cat "$work/run-cursor.out" >&2; exit 1; }
psql -q "$bench_url" >/dev/null <<SQL
CREATE TABLE snap AS SELECT id, md5(u::text) AS h FROM users u;
ALTER TABLE snap ADD PRIMARY KEY (id);
ANALYZE snap;
UPDATE users SET first_name = first_name || ' changed', updated_at = now() WHERE id IN (
  SELECT id FROM users WHERE id % 200 <> 0 ORDER BY id LIMIT $changed);
DELETE FROM users WHERE id % 200 = 0 AND id <= $((removed * 200));
INSERT INTO users
SELECT i, 'user' || i || '@example.com', 'New' || i, 'Last', 'free', 1, true, now(), now()
FROM generate_series($rows + 1, $rows + $added) AS i;
VACUUM ANALYZE users;
SQL

baseline_sql="COPY (SELECT u.*, s.id AS snap_id FROM users u FULL OUTER JOIN snap s ON s.id = u.id
  WHERE s.id IS NULL OR u.id IS NULL OR md5(u::text) <> s.h) TO STDOUT"
ours=() base=() peaks=()
for i in 1 2 3; do
  started=$(now)
  /usr/bin/time -f '%M' -o "$work/rss" "$bin" plan --json --sync users --config "$cfg" >"$work/plan.json"
  ours+=("$(calc "$(now) - $started" 3)")
  peaks+=("$(cat "$work/rss")")
  started=$(now)
  psql -q "$bench_url" -c "$baseline_sql" >"$work/baseline.out"
  base+=("$(calc "$(now) - $started" 3)")
  echo "  try $i: ours ${ours[-1]} s, baseline ${base[-1]} s" >&2
done
baseline_rows=$(wc -l <"$work/baseline.out")
counts=$(python3 -c '
import json, sys
p = json.load(open(sys.argv[1]))["data"]
p = p[0] if isinstance(p, list) else p
c = p.get("counts", p)
print(c["added"], c["changed"], c["removed"], c["unchanged"])' "$work/plan.json")
read -r p_added p_changed p_removed p_unchanged <<<"$counts"
want_unchanged=$((rows - changed - removed))
ours_m=$(median "${ours[@]}") base_m=$(median "${base[@]}") peak=$(median "${peaks[@]}")

echo "diff of a mirror sync, $rows rows (8 columns, 7 mapped), after adopt ($adopt_secs s):"
echo "  changes made: $changed changed, $removed removed, $added added"
printf '%-40s %12s\n' "" "median of 3"
printf '%-40s %10s s\n' "ours: loopsync plan --json" "$ours_m"
printf '%-40s %10s s\n' "baseline: md5 FULL OUTER JOIN, copied" "$base_m"
echo "ratio baseline / ours: $(calc "$base_m / $ours_m" 2)x"
echo "our peak RSS: $(calc "$peak / 1024") MiB"
echo "plan counts: added $p_added, changed $p_changed, removed $p_removed, unchanged $p_unchanged" \
  "(baseline rows: $baseline_rows)"
if [ "$p_added" -ne "$added" ] || [ "$p_changed" -ne "$changed" ] \
  || [ "$p_removed" -ne "$removed" ] || [ "$p_unchanged" -ne "$want_unchanged" ]; then
  echo "the plan's counts are not the changes made (unchanged should be $want_unchanged)" >&2
  exit 1
fi

# With a cursor: the incremental diff, against the md5 join and the window's rows alone.
window_sql="COPY (SELECT * FROM users WHERE updated_at >= (
  SELECT to_timestamp(cursor_high / 1000.0) - interval '1 hour' FROM loopsync.runs
   WHERE sync = 'users_cursor' AND cursor_high IS NOT NULL ORDER BY id DESC LIMIT 1)) TO STDOUT"
# Three tries right after the setup (the state just written: a million rows noted by the first
# run, none of it vacuumed nor analyzed), then three after `VACUUM ANALYZE` of the state, as
# autovacuum leaves it between two scheduled runs (then the full diff's three again).
incremental_tries() {
  inc=() inc_base=() inc_window=() inc_peaks=()
  for i in 1 2 3; do
    started=$(now)
    /usr/bin/time -f '%M' -o "$work/rss" "$bin" plan --json --sync users_cursor --config "$cfg" \
      >"$work/plan-cursor.json"
    inc+=("$(calc "$(now) - $started" 3)")
    inc_peaks+=("$(cat "$work/rss")")
    started=$(now)
    psql -q "$bench_url" -c "$baseline_sql" >/dev/null
    inc_base+=("$(calc "$(now) - $started" 3)")
    started=$(now)
    psql -q "$bench_url" -c "$window_sql" >"$work/window.out"
    inc_window+=("$(calc "$(now) - $started" 3)")
    echo "  try $i: ours ${inc[-1]} s, md5 join ${inc_base[-1]} s, window ${inc_window[-1]} s" >&2
  done
}
incremental_tries
fresh_m=$(median "${inc[@]}") fresh_base_m=$(median "${inc_base[@]}")
psql -q "$bench_url" -c "VACUUM ANALYZE loopsync.state" >/dev/null
incremental_tries
# The full diff again, on the vacuumed state.
vac=() vac_base=()
for i in 1 2 3; do
  started=$(now)
  "$bin" plan --json --sync users --config "$cfg" >/dev/null
  vac+=("$(calc "$(now) - $started" 3)")
  started=$(now)
  psql -q "$bench_url" -c "$baseline_sql" >/dev/null
  vac_base+=("$(calc "$(now) - $started" 3)")
  echo "  try $i (full diff, state vacuumed): ours ${vac[-1]} s, md5 join ${vac_base[-1]} s" >&2
done
vac_m=$(median "${vac[@]}") vac_base_m=$(median "${vac_base[@]}")
counts=$(python3 -c '
import json, sys
p = json.load(open(sys.argv[1]))["data"][0]
c = p["counts"]
print(p.get("diff"), c["added"], c["changed"], c["removed"], c["unchanged"])' "$work/plan-cursor.json")
read -r c_diff c_added c_changed c_removed c_unchanged <<<"$counts"
inc_m=$(median "${inc[@]}") inc_base_m=$(median "${inc_base[@]}")
inc_window_m=$(median "${inc_window[@]}") inc_peak=$(median "${inc_peaks[@]}")
echo
echo "the same with a cursor (sync users_cursor, cursor = \"updated_at\", lookback 1h):"
echo "  right after the setup (the state not vacuumed): ours $fresh_m s, md5 join $fresh_base_m s," \
  "ratio $(calc "$fresh_base_m / $fresh_m" 2)x"
echo "  after VACUUM ANALYZE of the state:"
printf '%-40s %10s s\n' "ours: loopsync plan --json ($c_diff)" "$inc_m"
printf '%-40s %10s s\n' "baseline: md5 FULL OUTER JOIN, copied" "$inc_base_m"
printf '%-40s %10s s (%s rows)\n' "window: rows since the cursor, copied" "$inc_window_m" \
  "$(wc -l <"$work/window.out")"
echo "ratio md5 join / ours: $(calc "$inc_base_m / $inc_m" 2)x;" \
  "window / ours: $(calc "$inc_window_m / $inc_m" 2)x"
echo "our peak RSS: $(calc "$inc_peak / 1024") MiB"
echo "plan counts: added $c_added, changed $c_changed, removed $c_removed, unchanged $c_unchanged"
echo
echo "no cursor, after VACUUM ANALYZE of the state: ours $vac_m s, md5 join $vac_base_m s," \
  "ratio $(calc "$vac_base_m / $vac_m" 2)x"
# No removal is found by an incremental diff; the removed rows are still noted, so unchanged.
if [ "$c_diff" != incremental ] || [ "$c_added" -ne "$added" ] || [ "$c_changed" -ne "$changed" ] \
  || [ "$c_removed" -ne 0 ] || [ "$c_unchanged" -ne $((rows - changed)) ]; then
  echo "the incremental plan's counts are not the changes made" >&2
  exit 1
fi

# The run after a first send of every row: Loops confirmed each, so the state has noted none,
# and the incremental diff reads every row as unnoted (by the semi-join on the key): once,
# against the full diff's time above.
psql -q "$bench_url" -c "UPDATE loopsync.state SET model_hash = NULL WHERE sync = 'users_cursor'" \
  -c "VACUUM ANALYZE loopsync.state" >/dev/null
started=$(now)
"$bin" plan --json --sync users_cursor --config "$cfg" >"$work/plan-unnoted.json"
unnoted_secs=$(calc "$(now) - $started" 3)
echo
counts=$(python3 -c '
import json, sys
p = json.load(open(sys.argv[1]))["data"][0]
c = p["counts"]
print(p.get("diff"), c["added"], c["changed"], c["removed"], c["unchanged"])' "$work/plan-unnoted.json")
echo "every key unnoted (as after a first send): ours $unnoted_secs s (one try), against the" \
  "full diff's $ours_m s; diff, added, changed, removed, unchanged: $counts"
