#!/usr/bin/env bash
# Make sure the browser the tests drive is there: Debian's chromium package, installed with
# apt-get when missing (Playwright is only the driver here; it downloads no browser of its own).
# DEQLITE_CHROMIUM points the tests at another Chromium/Chrome binary instead.
set -euo pipefail
chromium=${DEQLITE_CHROMIUM:-/usr/bin/chromium}
if [ -x "$chromium" ]; then
    echo "browser: $("$chromium" --version 2>/dev/null || echo "$chromium")"
    exit 0
fi
if [ -n "${DEQLITE_CHROMIUM:-}" ]; then
    echo "DEQLITE_CHROMIUM=$chromium is not an executable." >&2
    exit 1
fi
if [ "$(id -u)" = 0 ]; then
    sudo=()
elif command -v sudo >/dev/null; then
    sudo=(sudo)
else
    echo "chromium is missing: install Debian's chromium package (apt-get install chromium)," >&2
    echo "or set DEQLITE_CHROMIUM to a Chromium/Chrome binary." >&2
    exit 1
fi
echo "installing chromium with apt-get ..."
log=$(mktemp)
if ! { "${sudo[@]}" apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    rm -f "$log"
    echo "apt-get could not install chromium (see above)." >&2
    exit 1
fi
rm -f "$log"
echo "browser: $(/usr/bin/chromium --version 2>/dev/null)"
