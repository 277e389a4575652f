#!/usr/bin/env bash
# Cross-builds the agent for devices (aarch64 and armv7 Linux, glibc) with the `device`
# profile, prints each binary's size, and with `--test` runs end-to-end tests with each
# cross-built agent under qemu-user against a coordinator built for this machine: enrollment
# and facts, and rollouts of tiny models that the agent verifies, proves with a smoke
# prompt and serves through its local API. NANOFLEET_CROSS_TARGETS picks the targets.
#   deploy/cross-build.sh [--test]
# Installs what it needs on Debian: the rustup targets, the cross gcc, qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
declare -A gcc=([aarch64-unknown-linux-gnu]=aarch64-linux-gnu [armv7-unknown-linux-gnueabihf]=arm-linux-gnueabihf)
declare -A packages=([aarch64-unknown-linux-gnu]="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
                     [armv7-unknown-linux-gnueabihf]="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross")
declare -A qemu=([aarch64-unknown-linux-gnu]=qemu-aarch64 [armv7-unknown-linux-gnueabihf]=qemu-arm)
declare -A arch=([aarch64-unknown-linux-gnu]=aarch64 [armv7-unknown-linux-gnueabihf]=arm)
only=${NANOFLEET_CROSS_TARGETS:-${targets[*]}}
for target in $only; do
  if ! command -v "${gcc[$target]}-gcc" >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${packages[$target]} \
      || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${packages[$target]}; }
  fi
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
  cc_var="CC_${target//-/_}"
  env "$cc_var=${gcc[$target]}-gcc" cargo build --locked --profile device --target "$target" \
    -p nanofleet-agent --bin nanofleet-agent
  binary=${CARGO_TARGET_DIR:-target}/$target/device/nanofleet-agent
  printf '%-34s %s bytes (%s MiB), stripped\n' "$target" "$(stat -c %s "$binary")" \
    "$(( $(stat -c %s "$binary") / 1048576 ))"
done

if [ "${1:-}" = --test ]; then
  command -v qemu-aarch64 >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-user
  cargo build --locked --bins
  for target in $only; do
    # The quantized kernels' property tests, NEON included on aarch64, under qemu-user.
    runner_var="CARGO_TARGET_$(echo "${target//-/_}" | tr a-z A-Z)_RUNNER"
    env "$runner_var=${qemu[$target]} -L /usr/${gcc[$target]}" "CC_${target//-/_}=${gcc[$target]}-gcc" \
      cargo test --locked -p nanofleet-quant --target "$target"
    # The harness starts agents through the runner; everything else runs natively.
    NANOFLEET_E2E_AGENT="$(realpath "${CARGO_TARGET_DIR:-target}/$target/device/nanofleet-agent")" \
    NANOFLEET_E2E_AGENT_RUNNER="${qemu[$target]} -L /usr/${gcc[$target]}" \
    NANOFLEET_E2E_AGENT_ARCH="${arch[$target]}" \
      cargo test --locked -p nanofleet-e2e --test foundation --test rollouts -- \
        --skip real_model --skip state_survives --skip malformed --skip callers --skip tokens_are
  done
fi
