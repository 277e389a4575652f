#!/usr/bin/env bash
# PEFT parity end to end: nanofleet-train trains a q/v LoRA adapter (rank 8, alpha 16) for a
# few steps on fixed synthetic data and exports it as a PEFT directory (as `nanofleet adapter
# export` writes it); nanofleet_inference::Engine loads it back (LoraSource::PeftDir) and gives
# the next-token logits of fixed chat prompts, with and without it; transformers + PEFT load the
# same GGUF and the same directory and compute the same logits from the same token ids; the
# table compares them (train/tools/peft_parity.py says how, and the tolerance).
#
# Usage: train/tools/peft-parity.sh [GGUF] [PEFT_DIR]
#   GGUF      defaults to ~/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   PEFT_DIR  an existing PEFT adapter to check instead of training one
# Sharper check of the layout alone: an F32 GGUF requantized from the Q4_1 (same weights, no
# activation quantization on nanofleet's side), e.g.
#   llama-quantize --allow-requantize SmolLM2-135M-Instruct.Q4_1.gguf F32.gguf F32
#   KEEP=/tmp/p TOLERANCE_COSINE=0.999 train/tools/peft-parity.sh F32.gguf /tmp/p-q4/adapter
# Environment: TRAIN_STEPS (12), THREADS (2), TOLERANCE_COSINE (0.9; 0.999 for an F32 GGUF, see peft_parity.py), KEEP=dir (keep the
#   adapter and the logits there), CARGO_TARGET_DIR, NANOFLEET_PEFT_PYTHONPATH
#   (see train/tools/python-env.sh). Exit status 1 when the tolerance is not met.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
gguf=${1:-$HOME/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf}
adapter=${2:-}
threads=${THREADS:-2}
[ -f "$gguf" ] || { echo "no GGUF at $gguf" >&2; exit 1; }

# shellcheck source=python-env.sh
source "$here/python-env.sh"

(cd "$repo" && cargo build --release --quiet -p nanofleet-train --example peft_logits)
target=${CARGO_TARGET_DIR:-$repo/target}
if [ -n "${KEEP:-}" ]; then work=$KEEP; mkdir -p "$work"; else
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi

if [ -n "$adapter" ]; then
  source_args=(--adapter "$adapter")
else
  adapter=$work/adapter
  source_args=(--train-to "$adapter" --train-steps "${TRAIN_STEPS:-12}")
fi
echo "== nanofleet" >&2
"$target/release/examples/peft_logits" --gguf "$gguf" --out "$work/logits.json" \
  --threads "$threads" "${source_args[@]}"
echo "== transformers + PEFT" >&2
OMP_NUM_THREADS=$threads PYTHONPATH=$NANOFLEET_PEFT_PYTHONPATH python3 "$here/peft_parity.py" \
  --gguf "$gguf" --logits "$work/logits.json" --adapter "$adapter" --threads "$threads" \
  --tolerance-cosine "${TOLERANCE_COSINE:-0.9}" --json "$work/parity.json"
