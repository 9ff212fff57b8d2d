#!/usr/bin/env bash
# What tests/test_app.py needs beyond `make test`'s venv: the app extra (Gradio, with gradio_client) in the
# venv, and Debian's headless browser for the page's screenshot test. Without them those tests skip.
# Run it after the venv exists (make's $(VENV)/.installed), from the repository root: bash .ci/install-app-extras.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi
# torch is already pinned in the venv (the CPU build on a machine without a GPU); the extra does not touch it.
"$VENV/bin/pip" install -q -e ".[app]"
