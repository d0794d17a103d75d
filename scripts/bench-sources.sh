#!/usr/bin/env bash
# What reading a model from MySQL costs, against the same model read from PostgreSQL, in the
# same run.
#
#   scripts/bench-sources.sh [ROWS] [TRIES]     (defaults: 100000, 3)
#
# Builds ROWS users (8 columns) in a PostgreSQL database of its own (loopsync_bench_sources) and
# the same rows in a MariaDB database of the same name (both dropped at the end), and a mirror
# sync of them (7 mapped columns). Three deployments read them:
#   postgres          the model and the state in PostgreSQL (the native path);
#   mysql + sqlite    the model on MariaDB, the state in an SQLite file;
#   mysql + postgres  the model on MariaDB, the state in PostgreSQL (state_schema mysql_state).
# For each it times `loopsync plan --json` (wall time of the whole command, and its peak RSS by
# /usr/bin/time) on an empty state (every row new), then runs `loopsync adopt` and times the plan
# again (every row unchanged). Medians of TRIES; the ratio of each to the native path.
#
# Needs: psql, the mariadb client, /usr/bin/time (GNU), a PostgreSQL server (LOOPSYNC_BENCH_PG_URL,
# else LOOPSYNC_TEST_PG_URL) and a MariaDB server (LOOPSYNC_BENCH_MYSQL_URL, else
# LOOPSYNC_TEST_MYSQL_URL), each a URL whose user may create databases. The rows are made with
# MariaDB's sequence engine (`seq_1_to_N`). LOOPSYNC_BIN names the binary; else the release build
# is made and used.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-100000}
tries=${2:-3}
db=loopsync_bench_sources
# pg_url, bin, bench_url, work, calc, now, start_sim (see the file).
. scripts/bench-lib.sh
mysql_url=${LOOPSYNC_BENCH_MYSQL_URL:-${LOOPSYNC_TEST_MYSQL_URL:-}}
if [ -z "$mysql_url" ]; then
  echo "set LOOPSYNC_BENCH_MYSQL_URL (or LOOPSYNC_TEST_MYSQL_URL) to a MariaDB URL" >&2
  exit 2
fi
# mysql://user[:password]@host[:port][/db] → the client's options.
read -r my_user my_pass my_host my_port < <(python3 -c '
import sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
print(u.username or "root", u.password or "-", u.hostname or "127.0.0.1", u.port or 3306)' "$mysql_url")
my() {
  local pass=()
  [ "$my_pass" != - ] && pass=("-p$my_pass")
  mariadb -u "$my_user" "${pass[@]}" -h "$my_host" -P "$my_port" "$@"
}
mysql_bench_url="${mysql_url%%\?*}"
mysql_bench_url="${mysql_bench_url%/*}"
case "$mysql_bench_url" in mysql:/) mysql_bench_url=$mysql_url ;; esac
mysql_bench_url="${mysql_bench_url%/}/$db"

sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && { kill -KILL "$sim_pid"; wait "$sim_pid"; } 2>/dev/null || true
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  my -e "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "building $rows rows in PostgreSQL and in MariaDB…" >&2
make_pg_users "$rows"
my -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
my "$db" <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, email varchar(255), first_name varchar(255),
                    last_name varchar(255), plan varchar(16), seats int, newsletter boolean,
                    signed_up_at datetime);
INSERT INTO users
SELECT seq, concat('user', seq, '@example.com'), concat('First', seq), concat('Last', seq % 1000),
       elt(1 + seq % 3, 'free', 'pro', 'team'), 1 + seq % 50, seq % 2 = 0,
       '2024-01-01' + INTERVAL seq MINUTE
FROM seq_1_to_$rows;
SQL

start_sim

config() { # name, warehouse lines
  { printf '[warehouse]\n%s\n\n' "$2"; users_mirror_config; } >"$work/$1.toml"
}
config postgres "url = \"$bench_url\""
config mysql-sqlite "url = \"$mysql_bench_url\"
state = \"sqlite://$work/state.db\""
config mysql-postgres "url = \"$mysql_bench_url\"
state = \"$bench_url\"
state_schema = \"mysql_state\""

# Times the plan of deployment $1 TRIES times; prints "median_seconds peak_kib counts".
plan() {
  local times=() peaks=()
  for _ in $(seq "$tries"); do
    local started; started=$(now)
    /usr/bin/time -f '%M' -o "$work/rss" "$bin" plan --json --config "$work/$1.toml" >"$work/plan.json" \
      2>"$work/plan.err" || { cat "$work/plan.err" >&2; exit 1; }
    times+=("$(calc "$(now) - $started" 3)")
    peaks+=("$(cat "$work/rss")")
  done
  local counts; counts=$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["data"][0]["counts"]
print("added=%d,unchanged=%d" % (c["added"], c["unchanged"]))' "$work/plan.json")
  echo "$(median "${times[@]}") $(median "${peaks[@]}") $counts"
}

declare -A first adopted
for d in postgres mysql-sqlite mysql-postgres; do
  echo "  $d: plan on an empty state…" >&2
  first[$d]=$(plan "$d")
  "$bin" adopt --config "$work/$d.toml" >"$work/adopt.out" 2>&1 || { cat "$work/adopt.out" >&2; exit 1; }
  echo "  $d: plan after adopt…" >&2
  adopted[$d]=$(plan "$d")
done

echo "reading a $rows-row model (8 columns, 7 mapped): loopsync plan --json, median of $tries"
printf '%-18s %-14s %10s %8s %10s  %s\n' deployment state seconds "x native" "peak RSS" counts
for phase in empty adopted; do
  for d in postgres mysql-sqlite mysql-postgres; do
    if [ "$phase" = empty ]; then line=${first[$d]}; native=${first[postgres]}; else line=${adopted[$d]}; native=${adopted[postgres]}; fi
    read -r secs kib counts <<<"$line"
    read -r native_secs _ <<<"$native"
    printf '%-18s %-14s %10s %8s %7s MiB  %s\n' "$d" "$phase" "$secs" "$(calc "$secs / $native_secs" 2)" \
      "$(calc "$kib / 1024")" "$counts"
  done
done
