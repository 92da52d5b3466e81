#!/usr/bin/env bash
# Headless Chromium + chromedriver for tests/test_ui.py (Debian packages), installed once.
# Never fails the test run: without apt the UI test skips on a laptop and fails in CI.
set -u
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "Chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Chromium: not installed and no apt-get here (tests/test_ui.py will skip, and fail in CI)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "Chromium: not installed and not root (tests/test_ui.py will skip, and fail in CI)"
    exit 0
  fi
fi
log="$(mktemp)"
if DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -q >"$log" 2>&1 \
  && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >>"$log" 2>&1 \
  && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "Chromium: installed ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
else
  echo "Chromium: apt-get install failed (tests/test_ui.py will skip, and fail in CI); last lines:"
  tail -n 5 "$log" | sed 's/^/  /'
fi
rm -f "$log"
exit 0
