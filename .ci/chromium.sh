#!/usr/bin/env bash
# Debian's chromium, for the tests that open sw_lens's HTML pages in a real headless
# browser (tests/browser.py). Installed with apt as root; when that is impossible, the
# reason goes to $1 and those tests skip with it.
#
#   .ci/chromium.sh SKIP_REASON_FILE
set -uo pipefail
reason=${1:?usage: chromium.sh SKIP_REASON_FILE}
rm -f "$reason"

skip() {
    echo "$*" > "$reason"
    echo "chromium: not available: $*" >&2
    exit 0
}

command -v chromium > /dev/null && exit 0
command -v apt-get > /dev/null || skip "no apt-get to install chromium"
[ "$(id -u)" -eq 0 ] || skip "not root: cannot apt-get install chromium"
log="$(dirname "$reason")/chromium-apt.log"
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    > "$log" 2>&1 || skip "apt-get install chromium failed (see $log)"
command -v chromium > /dev/null || skip "chromium installed but not on PATH"
