#!/usr/bin/env bash
# Create .venv and install lmforge with its dependencies, only when needed (pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "lmforge needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
# a .venv left half-made (no pip: python3-venv missing, or the first run interrupted) or made by an older
# Python is made again
if [ -e .venv ] && ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "[setup] .venv is incomplete or older than Python 3.11: making it again" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  if ! "$PYTHON" -m venv .venv || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    rm -rf .venv
    echo "could not create a virtual environment with pip (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
stamp=.venv/.lmforge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing lmforge and its dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
