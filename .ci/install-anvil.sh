#!/usr/bin/env bash
# Install the local Ethereum chain and the Solidity compiler the anchoring tests
# use, into the project-local folder .tools/ (gitignored), when missing:
#   * anvil, from the npm package @foundry-rs/anvil: the binary ships inside the
#     platform package (@foundry-rs/anvil-linux-amd64, ...) that npm picks as an
#     optional dependency, so nothing is downloaded at run time and it runs offline;
#   * solcjs, from the npm package solc (the compiler compiled to WebAssembly).
# Debian's nodejs and npm are installed with apt-get only when node or npm is missing.
# Install scripts are not run (--ignore-scripts): anvil's postinstall only
# fetches the binary again when the optional dependency was skipped.
# The versions are pinned here; tests/integration/test_anchor_contract.py compiles
# the contract with this exact solc.
set -euo pipefail

ANVIL_VERSION=1.7.1
SOLC_VERSION=0.8.28
cd "$(dirname "$0")/.."
TOOLS=.tools
STAMP="$TOOLS/.installed-anvil-$ANVIL_VERSION-solc-$SOLC_VERSION"

if [ -f "$STAMP" ]; then
  exit 0
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-anvil.sh: node/npm not found; installing the Debian packages nodejs and npm..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    echo "install-anvil.sh: node and npm are required (Debian/Ubuntu: apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
echo "install-anvil.sh: installing @foundry-rs/anvil@$ANVIL_VERSION and solc@$SOLC_VERSION into $TOOLS/" >&2
mkdir -p "$TOOLS"
rm -f "$TOOLS"/.installed-anvil-*
npm install --prefix "$TOOLS" --no-audit --no-fund --ignore-scripts --loglevel=error \
  "@foundry-rs/anvil@$ANVIL_VERSION" "solc@$SOLC_VERSION" >/dev/null
ANVIL_BIN=$(ls "$TOOLS"/node_modules/@foundry-rs/anvil-*/bin/anvil 2>/dev/null | head -n 1 || true)
if [ -z "$ANVIL_BIN" ] || ! "$ANVIL_BIN" --version >/dev/null; then
  echo "install-anvil.sh: the anvil binary for this platform did not install" >&2
  exit 1
fi
"$TOOLS/node_modules/.bin/solcjs" --version >/dev/null
touch "$STAMP"
