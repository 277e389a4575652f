#!/usr/bin/env bash
# Builds the node agent and the inference benchmark with CUDA (cargo feature `cuda`) for
# x86_64 Linux with an NVIDIA driver for CUDA 13.0 or newer, on a machine with no CUDA
# installed: nvcc, the headers and the libraries to link against come from NVIDIA's CUDA
# 13.0 wheels on PyPI, installed once under ~/.cache/nanofleet/cuda-13.0.
#
# The binaries link dynamically against libcuda.so.1 (the driver), libcudart.so.13,
# libcublas(Lt).so.13, libcurand.so.10 and libnvrtc.so.13: the machine that runs them needs
# the driver and the CUDA 13 runtime libraries (a CUDA toolkit, or the same wheels on
# LD_LIBRARY_PATH). candle's kernels are built for CUDA_COMPUTE_CAP (default 90: H100/H200);
# its PTX is JIT-compiled by the driver for other GPUs of that capability or newer.
#
# The CPU build (`cargo build`) stays the default and needs none of this.
#
# Usage: deploy/gpu/build-cuda-agent.sh [OUT_DIR]
#   Writes nanofleet-agent, bench (the inference benchmark) and device_parity (GPU against
#   CPU greedy output) to OUT_DIR (default target-cuda/dist). env: CARGO_TARGET_DIR (default target-cuda), CUDA_COMPUTE_CAP (90).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/target-cuda/dist}"
prefix="${NANOFLEET_CUDA_PREFIX:-$HOME/.cache/nanofleet/cuda-13.0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# Pinned to CUDA 13.0 so that the PTX and the runtime match drivers from 580 (CUDA 13.0) on.
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)
stamp="$prefix/.installed-$(echo "${wheels[*]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  echo "installing the CUDA 13.0 toolkit wheels into $prefix" >&2
  rm -rf "$prefix"
  python3 -m pip install -q --disable-pip-version-check --target "$prefix/wheels" "${wheels[@]}"
  touch "$stamp"
fi
cuda_home="$prefix/wheels/nvidia/cu13"

# The wheels ship versioned sonames only; the linker looks for lib<name>.so. They ship no
# libcuda (the driver's library) either: link against a stub that defines the driver API
# symbols cudarc declares and carries the driver's soname, as the CUDA toolkit's own
# stubs/libcuda.so does. At run time the driver's real libcuda.so.1 is loaded.
link="$prefix/link"
mkdir -p "$link"
for lib in cublas cublasLt cudart curand nvrtc; do
  ln -sf "$(ls "$cuda_home/lib/lib$lib.so".* | head -1)" "$link/lib$lib.so"
done
if [[ ! -f "$link/libcuda.so" ]]; then
  cudarc_sys="$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -1)"
  grep -oE "fn cu[A-Za-z0-9_]+" "$cudarc_sys" | sort -u | sed 's/^fn \(.*\)$/void \1(void) {}/' \
    > "$link/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda-stub.c"
fi

export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" PATH="$cuda_home/bin:$PATH"
export LIBRARY_PATH="$link${LIBRARY_PATH:+:$LIBRARY_PATH}"
cd "$root"
echo "building with CUDA (compute capability $CUDA_COMPUTE_CAP) into $CARGO_TARGET_DIR" >&2
cargo build --release --locked \
  -p nanofleet-agent --features nanofleet-agent/cuda --bin nanofleet-agent \
  -p nanofleet-inference --example bench --example device_parity
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/nanofleet-agent" "$CARGO_TARGET_DIR/release/examples/bench" \
  "$CARGO_TARGET_DIR/release/examples/device_parity" "$out/"
strip "$out/nanofleet-agent" "$out/bench" "$out/device_parity"
ls -l "$out" >&2
