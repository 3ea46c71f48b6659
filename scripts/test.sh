#!/usr/bin/env bash
# The test suite. Tests that need the real data samples read LMFORGE_TEST_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-browser.sh
export LMFORGE_TEST_DATA="${LMFORGE_TEST_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest "$@"
