#!/usr/bin/env bash
# Set up (first time only) and start the web app on http://127.0.0.1:7860 with the built-in demo model.
# Extra arguments go to app.py, e.g. `bash run.sh --port 8000` (see `bash run.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
