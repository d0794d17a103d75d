# The set-up every bench script shares; sourced (`. scripts/bench-lib.sh`) from the repository's
# root, after the script has set `db`, the name of its own database. It leaves:
#   pg_url     the PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else LOOPSYNC_TEST_PG_URL)
#   bin        the loopsync binary (LOOPSYNC_BIN, else a release build made now)
#   bench_url  the URL of database `db` on that server
#   work       a new temporary folder
# and the functions calc (arithmetic, printed with N decimals), now (Unix seconds), start_sim (a
# simulator; sets sim_pid and sim_api), make_pg_users (database `db` with ROWS users) and
# users_mirror_config (the config after [warehouse]).
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
pg_url=${LOOPSYNC_BENCH_PG_URL:-${LOOPSYNC_TEST_PG_URL:-}}
if [ -z "$pg_url" ]; then
  echo "set LOOPSYNC_BENCH_PG_URL (or LOOPSYNC_TEST_PG_URL) to a PostgreSQL URL" >&2
  exit 2
fi
if [ -z "${LOOPSYNC_BIN:-}" ]; then
  cargo build --release -p loopsync >&2
  # Wherever the target folder is (CARGO_TARGET_DIR, or ./target).
  target_dir=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  LOOPSYNC_BIN=$target_dir/release/loopsync
fi
bin=$LOOPSYNC_BIN
# The same server, our own database: replace the path of the URL.
base=${pg_url%%\?*}
bench_url="${base%/*}/$db"
work=$(mktemp -d "${TMPDIR:-/tmp}/loopsync-bench.XXXXXX")

calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
now() { date +%s.%N; }

# Starts `loopsync sim` on a free port with the API key test-key and the given arguments, its
# output in $work/sim-$sim_n.out; sets sim_pid and sim_api (the API root, ending in /api).
sim_n=0
start_sim() {
  sim_n=$((sim_n + 1))
  local out=$work/sim-$sim_n.out
  "$bin" sim --port 0 --api-key test-key "$@" >"$out" 2>&1 &
  sim_pid=$!
  sim_api=""
  for _ in $(seq 100); do
    sim_api=$(grep -o 'http://[^ ]*/api' "$out" | head -1 || true)
    [ -n "$sim_api" ] && return 0
    sleep 0.1
  done
  echo "the simulator did not start: $(cat "$out")" >&2
  exit 1
}

# The config after its [warehouse] section: the simulator, and a mirror sync of `users` (8
# columns, 7 mapped). Call after start_sim.
users_mirror_config() {
  cat <<TOML
[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = 10

[[sync]]
name = "users"
model = "select id, email, first_name, last_name, plan, seats, newsletter, signed_up_at from users"
primary_key = "id"
identify_by = "email"
behavior = "mirror"

[sync.mapping]
email = "email"
firstName = "first_name"
lastName = "last_name"
planName = "plan"
seats = { column = "seats", type = "number" }
signedUpAt = { column = "signed_up_at", type = "date" }

[sync.mailing_lists]
"cm_news" = "newsletter"
TOML
}

# (Re)creates database `db` with a `users` table of $1 rows (8 columns), analyzed.
make_pg_users() {
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  psql -q "$bench_url" >/dev/null <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, email text, first_name text, last_name text,
                    plan text, seats int, newsletter boolean, signed_up_at timestamptz);
INSERT INTO users
SELECT i, 'user' || i || '@example.com', 'First' || i, 'Last' || (i % 1000),
       (ARRAY['free','pro','team'])[1 + i % 3], 1 + i % 50, i % 2 = 0,
       timestamptz '2024-01-01' + i * interval '1 minute'
FROM generate_series(1, $1) AS i;
ANALYZE users;
SQL
}
