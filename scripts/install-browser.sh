#!/usr/bin/env bash
# Headless Chromium + chromedriver (Debian packages) for the web page's browser test. Idempotent and quiet:
# does nothing when both are present, and only installs as root with apt-get (CI); otherwise the
# browser test skips and says why.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "[setup] chromium/chromedriver not installed (needs root + apt-get); the browser test will be skipped" >&2
  exit 0
fi
echo "[setup] installing chromium and chromium-driver (apt) for the browser test" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/tmp/lmforge-apt.log 2>&1; then
  echo "[setup] apt-get could not install chromium (see /tmp/lmforge-apt.log); the browser test will be skipped" >&2
fi
