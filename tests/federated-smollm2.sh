#!/usr/bin/env bash
# Federated LoRA on the real SmolLM2-135M: two agents, two rounds, a made-up answer
# format; prints the round table and the held-out exact match by round. Takes minutes.
# Usage: tests/federated-smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NANOFLEET_TEST_GGUF="${NANOFLEET_TEST_GGUF:-$(deploy/fetch-model.sh)}"
export NANOFLEET_TEST_GGUF
cargo build --workspace --bins --locked
cargo test --locked -p nanofleet-e2e --test federated \
  smollm2_two_agents_two_rounds_exact_match_rises -- --ignored --nocapture
