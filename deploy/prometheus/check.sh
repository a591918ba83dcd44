#!/usr/bin/env bash
# Validate the Talos alert rules and run their unit tests with promtool:
#   promtool check rules talos-alerts.yml
#   promtool test rules  talos-alerts.test.yml
# promtool comes from the Debian package `prometheus`. When it is missing and we
# run as root with apt-get available, it is installed; otherwise we stop with a
# message saying how to get it. PROMTOOL=/path/to/promtool overrides the lookup.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
promtool="${PROMTOOL:-promtool}"

if ! command -v "$promtool" >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "check.sh: promtool not found; installing the Debian package 'prometheus'..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
      echo "check.sh: installing 'prometheus' with apt-get failed" >&2
    fi
  fi
  if ! command -v "$promtool" >/dev/null 2>&1; then
    cat >&2 <<'MSG'
check.sh: promtool is required to check the Prometheus alert rules, and it is not on PATH.
  Debian/Ubuntu: sudo apt-get install prometheus   (provides /usr/bin/promtool)
  Elsewhere:     https://prometheus.io/download/ ; or set PROMTOOL=/path/to/promtool
MSG
    exit 127
  fi
fi

cd "$here"
"$promtool" check rules talos-alerts.yml
"$promtool" test rules talos-alerts.test.yml
