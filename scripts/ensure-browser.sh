#!/usr/bin/env bash
# The admin page's browser test drives Debian's Chromium through Playwright (no browser is
# downloaded). Install it when it is missing; fail loudly when it cannot be installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
echo "installing Debian's chromium for the browser test..." >&2
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
command -v chromium >/dev/null 2>&1 || { echo "chromium could not be installed" >&2; exit 1; }
