#!/usr/bin/env bash
# What tests/test_app.py needs beyond `make test`'s venv: Debian's headless browser (chromium, chromedriver)
# and the app extra (Gradio, with gradio_client). Without them those tests skip, saying why.
#
#   bash .ci/install-app-extras.sh                  # into .venv, after make has built it
#   VENV=.venv-app bash .ci/install-app-extras.sh   # a venv of its own, built here if missing; then
#   .venv-app/bin/python -m pytest -q tests/test_app.py
#
# Gradio 6.31 (the newest) caps pillow below 13 and tomlkit below 0.15: installed into a venv that holds
# newer ones, pip replaces them with pillow 12.3 and tomlkit 0.14 (both inside matvlm's own ranges).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi

if [ -x "$VENV/bin/python" ]; then
    "$VENV/bin/pip" install -q -e ".[app]"
else
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # As the Makefile: the CPU build of torch where there is no GPU (an unpinned torch pulls a multi-GB CUDA build).
    if command -v nvidia-smi >/dev/null 2>&1; then "$VENV/bin/pip" install -q "torch>=2.4,<2.14"; else "$VENV/bin/pip" install -q torch==2.13.0; fi
    "$VENV/bin/pip" install -q -e ".[test,app]"
fi
