#!/usr/bin/env bash
# Make PostgreSQL's server binaries (initdb, pg_ctl; Debian package `postgresql`)
# available for the registry's PostgreSQL tests, which start a throwaway cluster
# of their own (talos.testing.postgres: a temporary directory, a random loopback
# port, run as the `postgres` user when we are root). Nothing is started here.
# Debian keeps the binaries in /usr/lib/postgresql/<version>/bin, which the tests
# search as well as PATH. When they are missing and we run as root with apt-get,
# the package is installed. In CI (CI set) a failure to install fails the run:
# there the PostgreSQL tests must run, not skip; elsewhere they skip, saying why.
set -euo pipefail

have_postgres() {
  command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_postgres; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install-postgres.sh: initdb not found; installing the Debian package 'postgresql'..." >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; then
    echo "install-postgres.sh: installing 'postgresql' with apt-get failed" >&2
  fi
fi
if ! have_postgres; then
  cat >&2 <<'MSG'
install-postgres.sh: PostgreSQL (initdb) is not installed; the registry's PostgreSQL tests
  will be skipped (and fail in CI).
  Debian/Ubuntu: sudo apt-get install postgresql
MSG
  if [ -n "${CI:-}" ]; then
    exit 1
  fi
fi
