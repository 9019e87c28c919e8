#!/usr/bin/env bash
# The main job: set up, then run a local testbed of 8 nodes on 127.0.0.1 for 60 s (mDNS stays on
# loopback) and print their accuracy and consensus as they converge, with the network view in a browser
# (its URL printed at the start; GOSSIPFL_DASHBOARD_PORT picks the port, any free one by default, "none"
# serves none). Extra
# arguments go to 'gossipfl testbed', e.g. scripts/demo.sh --nodes 4 --duration 30.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
port="${GOSSIPFL_DASHBOARD_PORT:-0}"
dashboard=(--dashboard-port "$port")
[ "$port" = none ] && dashboard=()
exec .venv/bin/gossipfl testbed --nodes 8 --duration 60 --out results/demo "${dashboard[@]}" "$@"
