#!/usr/bin/env bash
# Set up (first time only) everything the tests need and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --dev
bash scripts/ensure_chromium.sh || echo "chromium is missing: the browser tests will fail (install Debian's chromium)"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# Two workers (pytest-xdist) on CI's two cores; TEST_WORKERS=0 runs everything in this process.
# --durations: the slowest tests in every log, so the next cut of the suite's time knows where to look.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup --durations=30 "$@"
