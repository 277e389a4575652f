#!/usr/bin/env bash
# Runs every test of nanofleet on a fresh machine: unit tests beside the code and the
# end-to-end tests in tests/, which start real coordinator and agent processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end harness runs the workspace binaries; build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked
