#!/usr/bin/env bash
# The browser tests drive Debian's chromium through Playwright. Install it when it is missing and we may.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else exit 1; fi
command -v apt-get >/dev/null || exit 1
echo "Installing Debian's chromium for the browser tests"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
