#!/usr/bin/env bash
# Prints the folder of a prebuilt libduckdb 1.5.6 (the release the `duckdb` crate of
# Cargo.toml binds), fetching it once into a cache: DuckDB's own build of the library, as
# the npm registry ships it in the package @duckdb/node-bindings-linux-<arch> (npm checks the
# package's integrity against the registry's checksum). Used by scripts/test.sh so that a
# fresh clone links DuckDB instead of compiling its C++ sources (some 18 minutes on 2 cores):
#
#   export DUCKDB_LIB_DIR=$(scripts/duckdb-lib.sh) LD_LIBRARY_PATH=$DUCKDB_LIB_DIR
#   cargo build --features duckdb
#
# Exits 1, printing nothing on stdout, where it cannot (no npm, no registry, another OS).
set -euo pipefail
VERSION=1.5.6-r.1
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) arch=x64 ;;
  Linux-aarch64) arch=arm64 ;;
  *) echo "duckdb-lib.sh: no prebuilt libduckdb for $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac
dir="${XDG_CACHE_HOME:-$HOME/.cache}/loopsync-test/libduckdb-$VERSION-$arch"
if [ ! -f "$dir/libduckdb.so" ]; then
  command -v npm >/dev/null || { echo "duckdb-lib.sh: npm not found" >&2; exit 1; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/libduckdb.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "@duckdb/node-bindings-linux-$arch@$VERSION" >/dev/null 2>&1 \
    && tar xzf ./*.tgz package/libduckdb.so) \
    || { echo "duckdb-lib.sh: could not fetch @duckdb/node-bindings-linux-$arch@$VERSION from npm" >&2; exit 1; }
  mkdir -p "$dir"
  mv "$work/package/libduckdb.so" "$dir/libduckdb.so.part"
  mv "$dir/libduckdb.so.part" "$dir/libduckdb.so"
fi
echo "$dir"
