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
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

changed=$((rows / 100))
removed=$((rows / 200))
added=$((rows / 200))

echo "building $rows rows…" >&2
make_pg_users "$rows"

start_sim

cfg=$work/loopsync.toml
{ printf '[warehouse]\nurl = "%s"\n\n' "$bench_url"; users_mirror_config; } >"$cfg"

started=$(now)
"$bin" adopt --sync users --config "$cfg" >"$work/adopt.out" 2>&1 \
  || { cat "$work/adopt.out" >&2; exit 1; }
adopt_secs=$(calc "$(now) - $started" 2)
psql -q "$bench_url" >/dev/null <<SQL
CREATE TABLE snap AS SELECT id, md5(u::text) AS h FROM users u;
ALTER TABLE snap ADD PRIMARY KEY (id);
ANALYZE snap;
UPDATE users SET first_name = first_name || ' changed' WHERE id IN (
  SELECT id FROM users WHERE id % 200 <> 0 ORDER BY id LIMIT $changed);
DELETE FROM users WHERE id % 200 = 0 AND id <= $((removed * 200));
INSERT INTO users
SELECT i, 'user' || i || '@example.com', 'New' || i, 'Last', 'free', 1, true, now()
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
