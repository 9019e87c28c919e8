#!/usr/bin/env bash
# Make sure a Chromium for the dashboard's browser tests is there (tests/browser.py), installing Debian's
# `chromium` package where this can: as root with apt-get. Elsewhere it says how, and those tests skip.
#   GOSSIPFL_NO_BROWSER=1 scripts/test.sh    # never install one (the browser tests skip)
#   GOSSIPFL_CHROMIUM=/path/to/chrome ...      # use this binary
set -uo pipefail

found() {
    [ -n "${GOSSIPFL_CHROMIUM:-}" ] && [ -x "$GOSSIPFL_CHROMIUM" ] && return 0
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
        || command -v google-chrome-stable >/dev/null
}

found && exit 0
if [ "${GOSSIPFL_NO_BROWSER:-}" = 1 ]; then
    echo "browser: no Chromium (GOSSIPFL_NO_BROWSER=1): the dashboard's browser tests will be skipped"
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "browser: installing Debian's chromium for the dashboard's browser tests (about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp -t gossipfl-apt-chromium.XXXXXX)"
    # at most 10 minutes in all (an unreachable mirror or a held dpkg lock must not hold the tests up)
    if timeout 300 apt-get install -y -q --no-install-recommends chromium >"$log" 2>&1 \
        || { timeout 120 apt-get update -q >>"$log" 2>&1 \
            && timeout 180 apt-get install -y -q --no-install-recommends chromium >>"$log" 2>&1; }; then
        found && exit 0
    fi
    echo "browser: could not install chromium (see $log): the browser tests will be skipped"
    exit 0
fi
echo "browser: no Chromium found: the dashboard's browser tests will be skipped (install Debian's chromium," \
    "or run 'python -m playwright install chromium', or set GOSSIPFL_CHROMIUM)"
exit 0
