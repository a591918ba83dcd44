#!/usr/bin/env bash
# Once, before the example runs: two agent homes in DIR (default: here), and a grant
# each way (the tool server may write to the planner and back), stored by the
# holder with `capabilities add` so that send() attaches it by itself.
set -euo pipefail
cd "${1:-.}"
planner=$(talos --home planner-home init --name planner --no-passphrase)
tools=$(talos --home tools-home init --name tools --no-passphrase)
talos --home planner-home whoami --export-log planner.keylog >/dev/null
talos --home tools-home whoami --export-log tools.keylog >/dev/null
to_planner=$(talos --home tools-home capabilities grant --to "$planner" \
    --action message.send --expires-in 30d)
to_tools=$(talos --home planner-home capabilities grant --to "$tools" \
    --action message.send --expires-in 30d)
talos --home planner-home capabilities add "$to_planner" --issuer-log tools.keylog >/dev/null
talos --home tools-home capabilities add "$to_tools" --issuer-log planner.keylog >/dev/null
echo "$tools" > tools.id
echo "tool server: $tools (in tools.id)"
