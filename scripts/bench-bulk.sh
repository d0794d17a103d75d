#!/usr/bin/env bash
# A first sync of ROWS new contacts through the bulk lane, against the API lane measured in the
# same run.
#
#   scripts/bench-bulk.sh [ROWS] [SAMPLE]     (defaults: 1000000 and 300)
#
# Creates a PostgreSQL database of its own (loopsync_bench_bulk, dropped at the end) with a
# `users` table of ROWS new rows (8 columns, 7 mapped, a mailing list on half of them), starts
# the simulator at Loops' 10 requests/s and times each step of the bulk lane:
#   loopsync export → POST /_sim/import of each file (its lists ticked) → GET /_sim/export →
#   loopsync adopt --from-loops-export → loopsync run --once (what the upload missed)
# then `verify --from-loops-export` over every contact (drift 0), and again after 100 contacts
# were edited in the simulator (all 100 found). The API lane (`run --once` at
# requests_per_second = 10 against a simulator limited to 10/s) is measured on SAMPLE rows of
# the same table and extrapolated to ROWS (said so in the output). Requests are the simulator's
# /_sim/stats counts (an upload or an export is no API request).
#
# Needs: psql, curl, python3, a PostgreSQL server (LOOPSYNC_BENCH_PG_URL, else
# LOOPSYNC_TEST_PG_URL). LOOPSYNC_BIN names the binary; else the release build is made and used.
# KEEP=1 keeps the working folder (the files, the exports, each command's output) for a look.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=${1:-1000000}
sample=${2:-300}
db=loopsync_bench_bulk
# pg_url, bin, bench_url and work (see the file).
. scripts/bench-lib.sh
sim_pid=""
cleanup() {
  [ -n "$sim_pid" ] && { kill -KILL "$sim_pid" 2>/dev/null; wait "$sim_pid" 2>/dev/null; } || true
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS ${db}_api" >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# The config of a sync of database $1 against the simulator started last.
config() {
  cat <<TOML
[warehouse]
url = "$1"

[loops]
api_key = "test-key"
base_url = "$sim_api"
requests_per_second = 10

[[sync]]
name = "users"
model = "select id, email, first_name, last_name, plan, seats, newsletter, signed_up_at from users"
primary_key = "id"
identify_by = "email"
behavior = "upsert"

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
# API requests the simulator answered so far.
requests() { curl -s "${sim_api%/api}/_sim/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["total_requests"])'; }
# Drift of a `verify --json` report on stdin: "checked drifted requests".
drift() { python3 -c '
import json, sys
text = sys.stdin.read(); r = json.loads(text[text.index("{"):])
r = r.get("data", r)
print(r["checked"], r["drifted"], sum(s["requests"] for s in r["syncs"]))'; }

make_pg_users "$rows"
start_sim --rate-limit 10 --list cm_news=Newsletter
cfg=$work/bulk.toml
config "$bench_url" >"$cfg"
"$bin" check --create-properties --config "$cfg" >/dev/null
base_requests=$(requests)

t0=$(now)
"$bin" export --sync users --out "$work/upload" --config "$cfg" >"$work/export.out"
t1=$(now)
for f in "$work"/upload/*.csv; do
  name=$(basename "$f" .csv)
  lists=""
  case "$name" in users.lists-*) lists=$(echo "${name#users.lists-}" | sed 's/\.part-[0-9]*$//; s/+/,/g') ;; esac
  curl -sf --data-binary "@$f" "${sim_api%/api}/_sim/import?lists=$lists" >"$work/import-$name.json"
done
t2=$(now)
curl -sf "${sim_api%/api}/_sim/export" -o "$work/audience.csv"
t3=$(now)
"$bin" adopt --sync users --from-loops-export "$work/audience.csv" --config "$cfg" >"$work/adopt.out"
t4=$(now)
"$bin" run --once --json --config "$cfg" >"$work/run.json" 2>"$work/run.err" || true
t5=$(now)
bulk_requests=$(( $(requests) - base_requests ))
files=$(ls "$work"/upload/*.csv | wc -l)
failed=$(python3 -c 'import json, sys; print(sum(json.load(open(f))["failed"] for f in sys.argv[1:]))' "$work"/import-*.json)

t6=$(now)
read -r checked drifted vreq < <("$bin" verify --json --from-loops-export "$work/audience.csv" --config "$cfg" | drift || true)
t7=$(now)
# 100 contacts edited in Loops (through its API, as another tool would), then a new export.
for i in $(seq 1 100); do
  id=$(( (i * 7919) % rows + 1 ))
  curl -s -X PUT -H 'Authorization: Bearer test-key' -H 'Content-Type: application/json' \
    -d "{\"email\": \"user$id@example.com\", \"planName\": \"edited\"}" "$sim_api/v1/contacts/update" >/dev/null
  sleep 0.11
done
curl -sf "${sim_api%/api}/_sim/export" -o "$work/audience-edited.csv"
t8=$(now)
read -r checked2 drifted2 vreq2 < <("$bin" verify --json --from-loops-export "$work/audience-edited.csv" --config "$cfg" | drift || true)
t9=$(now)
kill -KILL "$sim_pid"; wait "$sim_pid" 2>/dev/null || true; sim_pid=""

# The API lane on a sample of the same table, at 10 requests/s.
psql -q "$pg_url" -c "DROP DATABASE IF EXISTS ${db}_api" -c "CREATE DATABASE ${db}_api TEMPLATE $db" >/dev/null
api_url="${bench_url%/*}/${db}_api"
# The rows only: the copy's state (the bulk lane's) is dropped, its first sync starts afresh.
psql -q "$api_url" -c "DELETE FROM users WHERE id > $sample" -c "DROP SCHEMA IF EXISTS loopsync CASCADE" >/dev/null
start_sim --rate-limit 10 --list cm_news=Newsletter
api_cfg=$work/api.toml
config "$api_url" >"$api_cfg"
"$bin" check --create-properties --config "$api_cfg" >/dev/null
api_base=$(requests)
a0=$(now)
"$bin" run --once --json --config "$api_cfg" >"$work/api-run.json" 2>"$work/api-run.err" || true
a1=$(now)
api_requests=$(( $(requests) - api_base ))

bulk_total=$(calc "$t5 - $t0" 1)
api_secs=$(calc "$a1 - $a0" 1)
api_full=$(calc "$api_secs * $rows / $sample" 0)
echo "first sync of $rows new contacts (upsert, 7 mapped properties, a list on half), Loops at 10 requests/s:"
echo "  bulk lane: $bulk_total s wall, $bulk_requests API requests"
echo "    export $(calc "$t1 - $t0" 1) s ($files files) · upload (/_sim/import) $(calc "$t2 - $t1" 1) s ($failed rows failed) · audience export $(calc "$t3 - $t2" 1) s · adopt --from-loops-export $(calc "$t4 - $t3" 1) s · run --once $(calc "$t5 - $t4" 1) s"
echo "  API lane, measured on $sample rows: $api_secs s, $api_requests requests; extrapolated to $rows rows: $api_full s ($(calc "$api_full / 3600" 1) h), $(( api_requests - sample + rows )) requests (one per contact, and the same set-up requests)"
echo "  ratio (API lane extrapolated / bulk lane): $(calc "$api_full / $bulk_total" 0)x"
echo "  verify --from-loops-export over every contact: $(calc "$t7 - $t6" 1) s, checked $checked, drifted $drifted, $vreq requests (verify --sample all through the API: $(calc "$rows / 10 / 3600" 1) h at 10/s)"
echo "  after 100 contacts edited in the simulator: $(calc "$t9 - $t8" 1) s, checked $checked2, drifted $drifted2, $vreq2 requests"
