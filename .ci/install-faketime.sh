#!/usr/bin/env bash
# Make `faketime` (Debian package `faketime`, libfaketime's wrapper) available
# for tests/integration/test_clock_skew.py, which runs Talos processes with a
# shifted wall clock. When it is missing and we run as root with apt-get
# available, it is installed; otherwise we say how to get it and exit 0: the
# clock-skew tests then skip with that reason instead of failing the run.
# TALOS_TEST_LIBFAKETIME=/path/to/libfaketime.so.1 is honoured by the tests
# (not by this script); they preload the library rather than run the wrapper.
set -euo pipefail

if command -v faketime >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install-faketime.sh: faketime not found; installing the Debian package 'faketime'..." >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends faketime >/dev/null; }; then
    echo "install-faketime.sh: installing 'faketime' with apt-get failed" >&2
  fi
fi
if ! command -v faketime >/dev/null 2>&1; then
  cat >&2 <<'MSG'
install-faketime.sh: faketime is not on PATH; the clock-skew tests will be skipped.
  Debian/Ubuntu: sudo apt-get install faketime
  Elsewhere:     https://github.com/wolfcw/libfaketime (provides the faketime wrapper)
MSG
fi
