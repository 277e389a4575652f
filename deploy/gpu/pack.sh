#!/usr/bin/env bash
# Stages everything the GPU check needs in one directory, to copy to a GPU machine that has
# no Rust toolchain and no network, where deploy/gpu/run-on-gpu.sh runs it:
#   nanofleet-agent, bench, device_parity   built with CUDA by build-cuda-agent.sh
#   SmolLM2-135M-Instruct.Q4_1.gguf         the reference model (deploy/fetch-model.sh)
#   smollm2-llama-cpp.json                  the greedy prompts and llama.cpp's CPU output
#   llama-src.tar.xz                        llama.cpp's source, for its CUDA build there
#   run-on-gpu.sh
# With PART_MIB set (for a copy that limits each transfer), all but run-on-gpu.sh go into one
# tar stream (binaries xz-compressed), cut into parts of at most PART_MIB MiB:
# bundle.tar.partNN; run-on-gpu.sh joins and unpacks them. It checks the model's SHA-256
# (model.sha256) either way.
#
# Usage: deploy/gpu/pack.sh OUT_DIR   env: PART_MIB, NANOFLEET_TEST_GGUF, LLAMA_CPP_DIR
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${1:?usage: deploy/gpu/pack.sh OUT_DIR}"
model="${NANOFLEET_TEST_GGUF:-$HOME/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -f "$model" ]] || "$root/deploy/fetch-model.sh" >&2
llama_cpp="${LLAMA_CPP_DIR:-$HOME/.cache/nanofleet/llama.cpp}"
[[ -d "$llama_cpp/src" ]] || "$root/inference/tools/build-llama-cpp.sh" >/dev/null

binaries="$(mktemp -d)"
trap 'rm -rf "$binaries"' EXIT
"$here/build-cuda-agent.sh" "$binaries"

rm -rf "$out"
mkdir -p "$out"
cp "$here/run-on-gpu.sh" "$out/"
testdata="$root/inference/testdata/smollm2-llama-cpp.json"
# Only what a CUDA build of llama-bench reads (no docs, models, web UI, tests).
tar -cJf "$out/llama-src.tar.xz" -C "$llama_cpp" --anchored \
  --exclude=src/docs --exclude=src/models --exclude=src/media --exclude=src/tools/ui \
  --exclude=src/examples --exclude=src/tests --exclude=src/benches --exclude=src/gguf-py \
  --exclude=src/ci src
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") >"$out/model.sha256"
if [[ -n "${PART_MIB:-}" ]]; then
  tar -cf - -C "$binaries" nanofleet-agent bench device_parity | xz -9 -T1 >"$out/bin.tar.xz"
  cp "$model" "$out/"
  (cd "$out" && cp "$testdata" . &&
    tar -cf - bin.tar.xz llama-src.tar.xz model.sha256 "$(basename "$testdata")" "$(basename "$model")" |
    split -b "${PART_MIB}M" -d - bundle.tar.part &&
    rm bin.tar.xz llama-src.tar.xz model.sha256 "$(basename "$testdata")" "$(basename "$model")")
else
  cp "$binaries"/{nanofleet-agent,bench,device_parity} "$model" "$testdata" "$out/"
fi
ls -l "$out" >&2
