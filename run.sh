#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine (only Python 3.11+ needed):
#   bash run.sh build  - build the default soundscape map (snakemake, config/config.yaml; see README)
#   bash run.sh test   - run the test suite
# It creates .venv on first use and reinstalls only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
# The CPU wheel here; on GPU clusters install your CUDA build of torch first (see README).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV ..."
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "installing dependencies into $VENV (first run takes a few minutes) ..."
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
        "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

# The HTML-preview tests drive a headless Chromium; install Debian's when we can (root + apt).
browser() {
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing chromium and chromium-driver for the preview tests ..."
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
        else
            echo "note: install chromium and chromium-driver (Debian packages) for the HTML preview tests" >&2
        fi
    fi
}

case "${1:-}" in
    build)
        shift
        setup
        exec "$VENV/bin/snakemake" --profile profiles/local "$@"
        ;;
    test)
        shift
        setup
        browser
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash run.sh build|test [args...]" >&2
        exit 2
        ;;
esac
