#!/usr/bin/env bash
# Prints nanofleet-inference's and llama.cpp's speed on the same model, prompt length and
# thread count, one after the other, with the machine's load before each.
# Usage: inference/tools/bench.sh [THREADS] [MAX_TOKENS]   (env NANOFLEET_TEST_GGUF picks the model)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
threads="${1:-1}"
max_tokens="${2:-128}"
model="${NANOFLEET_TEST_GGUF:-$HOME/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
prompt="Explain in a few sentences why the sky is blue."
bin="$("$here/build-llama-cpp.sh")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../../target}"
cargo build -q --release -p nanofleet-inference --example generate

echo "== nanofleet-inference (candle), $threads thread(s); load: $(cut -d' ' -f1-3 /proc/loadavg)"
CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
  "$CARGO_TARGET_DIR/release/examples/generate" "$model" "$prompt" "$max_tokens" >/dev/null
echo "== llama.cpp llama-bench, $threads thread(s); load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin/llama-bench" -m "$model" -t "$threads" -p 41 -n "$max_tokens" -r 3 2>/dev/null
