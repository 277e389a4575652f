#!/usr/bin/env bash
# One LoRA training step: nanofleet-train against PyTorch + transformers + PEFT, on CPU, on the
# same GGUF and the same token ids.
#
# Usage: train/bench/train-step.sh [GGUF] [STEPS]
#   GGUF   defaults to ~/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   STEPS  timed steps after one warm-up step (default 5)
# Environment: THREADS (2), SEQ (256), BATCH (4), RANK (8), ALPHA (16),
#   CARGO_TARGET_DIR (cargo's default), NANOFLEET_PEFT_PYTHONPATH (where the Python stack goes,
#   ~/.cache/nanofleet/python-peft; installed on first use, see train/tools/python-env.sh).
#
# The step: batch 4 × 256 tokens, LoRA rank 8, alpha 16 on q and v, no dropout, AdamW lr 1e-4;
# loss = mean cross-entropy over response tokens. Data: train/bench/make_data.py (fixed seed),
# tokenized once by nanofleet (chat template, as Trainer::train does) and handed to PyTorch as
# ids. Prints each side's JSON line, then a table and the speed ratio.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
gguf=${1:-$HOME/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf}
steps=${2:-5}
threads=${THREADS:-2} seq=${SEQ:-256} batch=${BATCH:-4} rank=${RANK:-8} alpha=${ALPHA:-16}
[ -f "$gguf" ] || { echo "no GGUF at $gguf" >&2; exit 1; }

# shellcheck source=../tools/python-env.sh
source "$repo/train/tools/python-env.sh"

(cd "$repo" && cargo build --release --quiet -p nanofleet-train --example train_step)
target=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 "$here/make_data.py" "$work/data.jsonl" "$batch"
echo "== nanofleet ($gguf, $threads threads)" >&2
"$target/release/examples/train_step" --gguf "$gguf" --data "$work/data.jsonl" \
  --steps "$steps" --threads "$threads" --seq "$seq" --batch "$batch" --rank "$rank" \
  --alpha "$alpha" --tokens-out "$work/tokens.jsonl" | tee "$work/nanofleet.json"
echo "== PyTorch + transformers + PEFT" >&2
OMP_NUM_THREADS=$threads PYTHONPATH=$NANOFLEET_PEFT_PYTHONPATH python3 "$here/train_step.py" \
  --gguf "$gguf" --tokens "$work/tokens.jsonl" --steps "$steps" --threads "$threads" \
  --rank "$rank" --alpha "$alpha" | tee "$work/pytorch.json"

python3 - "$work/nanofleet.json" "$work/pytorch.json" <<'PY'
import json, sys
nf, pt = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
print()
print(f"one LoRA step: batch {nf['batch']} x seq {nf['seq']}, rank {nf['rank']}, alpha {nf['alpha']:g}, "
      f"q+v, {nf['threads']} threads, median of {nf['steps']} steps after 1 warm-up")
fmt = "{:<28} {:>10} {:>10} {:>14} {:>10} {:>12}"
print(fmt.format("", "s/step", "tokens/s", "peak RSS MiB", "load s", "step-0 loss"))
for name, r in (("nanofleet (Q4_1 quantized)", nf), ("PyTorch+PEFT (f32)", pt)):
    print(fmt.format(name, f"{r['seconds_per_step']:.3f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['peak_rss_mib']:.0f}", f"{r['load_seconds']:.1f}",
                     f"{r['loss_first_step']:.4f}"))
print(f"speed nanofleet / PyTorch: {pt['seconds_per_step'] / nf['seconds_per_step']:.2f}x "
      f"(>1: nanofleet faster); peak RSS nanofleet / PyTorch: {nf['peak_rss_mib'] / pt['peak_rss_mib']:.2f}")
PY
