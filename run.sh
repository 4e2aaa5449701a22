#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine (only Python 3.11+ needed):
#   bash run.sh build  - build the default soundscape map (snakemake, config/config.yaml; see README)
#   bash run.sh unlock - release the lock a build killed hard (kill -9, power loss) left behind
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

# Debian packages some tests drive, installed when we can (root + apt): headless Chromium for the HTML preview,
# Debian's own GDAL (gdalinfo, gdallocationinfo, osgeo) and PyQGIS, which open the Zarr store and the COGs
# as GIS users' Debian 12 tools (GDAL 3.6, QGIS 3.22) do, and SLURM 22.05, a one-node cluster the tests start to
# run the workflow through profiles/slurm.
debian_test_tools() {
    local missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    [ -x /usr/bin/gdalinfo ] && [ -x /usr/bin/gdallocationinfo ] || missing+=(gdal-bin)
    /usr/bin/python3 -c 'from osgeo import gdal' 2>/dev/null || missing+=(python3-gdal)
    /usr/bin/python3 -c 'import qgis.core' 2>/dev/null || missing+=(python3-qgis)
    [ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
    [ -x /usr/sbin/slurmd ] || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing ${missing[*]} for the preview, GIS-tool and SLURM tests ..."
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
        else
            echo "note: install ${missing[*]} (Debian packages) for the preview, GIS-tool and SLURM tests" >&2
        fi
    fi
}

case "${1:-}" in
    build)
        shift
        setup
        exec "$VENV/bin/python" -m pipeline.launch --profile profiles/local "$@"
        ;;
    unlock)
        shift
        setup
        exec "$VENV/bin/python" -m pipeline.launch --profile profiles/local --unlock "$@"
        ;;
    test)
        shift
        setup
        debian_test_tools
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash run.sh build|unlock|test [args...]" >&2
        exit 2
        ;;
esac
