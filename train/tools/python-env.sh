# Sourced by train/bench/train-step.sh and train/tools/peft-parity.sh: makes sure a CPU-only
# PyTorch + transformers + PEFT + gguf stack is installed beside (not into) the system Python,
# and exports PYTHONPATH for it.
#
# How (and why this way): PyPI's Linux x86_64 torch wheel is a CUDA build whose requirements
# pull ~2 GB of nvidia-*/cuda-* wheels (3+ GB installed); CPU wheels live only on the PyTorch
# index, which is not reachable here. So:
#   1. torch alone, `pip install --no-deps` (pinned: the stubs below are checked against it);
#   2. torch_cpu_stubs.py writes tiny stand-ins (~300 KB) for the CUDA libraries torch links,
#      so that it imports and runs on CPU (torch.cuda.is_available() is False);
#   3. everything else transformers/peft/gguf/accelerate need, resolved by pip (--dry-run
#      --report) and installed with --no-deps minus torch, triton and the nvidia/cuda wheels.
# Override the directory with NANOFLEET_PEFT_PYTHONPATH.

NANOFLEET_PEFT_PYTHONPATH=${NANOFLEET_PEFT_PYTHONPATH:-$HOME/.cache/nanofleet/python-peft}
NANOFLEET_TORCH_VERSION=${NANOFLEET_TORCH_VERSION:-2.15.0}
_nanofleet_tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

_nanofleet_pip() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

_nanofleet_python_ok() {
  PYTHONPATH=$NANOFLEET_PEFT_PYTHONPATH python3 - <<'PY' 2>/dev/null
import torch, transformers, peft, gguf, safetensors, numpy
a = torch.randn(64, 64, requires_grad=True)
(a @ a).sum().backward()
assert a.grad is not None and not torch.cuda.is_available()
PY
}

if ! _nanofleet_python_ok; then
  echo "installing torch $NANOFLEET_TORCH_VERSION (CPU use, CUDA stubs), transformers, peft, gguf into $NANOFLEET_PEFT_PYTHONPATH" >&2
  mkdir -p "$NANOFLEET_PEFT_PYTHONPATH"
  if ! PYTHONPATH=$NANOFLEET_PEFT_PYTHONPATH python3 -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$NANOFLEET_TORCH_VERSION')" 2>/dev/null; then
    _nanofleet_pip --no-deps --upgrade --target "$NANOFLEET_PEFT_PYTHONPATH" "torch==$NANOFLEET_TORCH_VERSION" || return 1
  fi
  python3 "$_nanofleet_tools_dir/torch_cpu_stubs.py" "$NANOFLEET_PEFT_PYTHONPATH" >&2 || return 1
  _report=$(mktemp)
  _nanofleet_pip --dry-run --ignore-installed --report "$_report" \
    "torch==$NANOFLEET_TORCH_VERSION" transformers peft gguf accelerate numpy sentencepiece || return 1
  _reqs=$(python3 - "$_report" <<'PY'
import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if re.match(r"(torch|triton|nvidia-.*|cuda-.*)$", name.lower()):
        continue
    print(f"{name}=={version}")
PY
)
  rm -f "$_report"
  # shellcheck disable=SC2086
  _nanofleet_pip --no-deps --upgrade --target "$NANOFLEET_PEFT_PYTHONPATH" $_reqs || return 1
  _nanofleet_python_ok || { echo "the Python stack does not import" >&2; return 1; }
fi
export NANOFLEET_PEFT_PYTHONPATH
