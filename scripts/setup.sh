#!/usr/bin/env bash
# Make or update ./.venv with what the app needs (`setup.sh`) or what the tests need too (`setup.sh --dev`).
# Idempotent: when the requirement files have not changed since the last run, it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=app
[ "${1:-}" = "--dev" ] && mode=dev
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
torch_spec=${TORCH_SPEC:-torch==2.13.0}   # a GPU user installs the CUDA build first; an installed torch is kept

if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

files=(requirements.txt constraints.txt)
[ $mode = dev ] && files+=(requirements-dev.txt)
stamp=".venv/.setup-$mode"
want=$(cat "${files[@]}" scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "Installing $torch_spec"
  "${pip[@]}" install "$torch_spec"
fi
# Pin torch to whatever is installed, so no requirement can pull a different (multi-GB) build.
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv/torch-constraint.txt
echo "Installing requirements ($mode)"
reqs=(-r requirements.txt)
[ $mode = dev ] && reqs+=(-r requirements-dev.txt)
"${pip[@]}" install -c .venv/torch-constraint.txt -c constraints.txt "${reqs[@]}"
if [ $mode = dev ]; then
  # Only for scripts/build_tokenizer.py's check that the shipped CLIP vocabulary is OpenAI's; its own
  # dependencies (torchvision, timm) are not wanted here.
  "${pip[@]}" install --no-deps open_clip_torch==3.3.0
fi
echo "$want" > "$stamp"
