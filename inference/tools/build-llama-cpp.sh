#!/usr/bin/env bash
# Builds llama.cpp (the comparison engine for nanofleet-inference's test data and
# benchmarks) outside the repository and prints its bin directory.
#
# Debian has no llama.cpp package, so the source comes from the llama-cpp-python sdist
# on PyPI (its vendor/llama.cpp), fetched by pip without building the Python package.
# Usage: inference/tools/build-llama-cpp.sh   (env LLAMA_CPP_DIR, default ~/.cache/nanofleet/llama.cpp)
set -euo pipefail

root="${LLAMA_CPP_DIR:-$HOME/.cache/nanofleet/llama.cpp}"
bin="$root/build/bin"
targets=(llama-tokenize llama-completion llama-bench llama-quantize)

if [[ -x "$bin/llama-tokenize" && -x "$bin/llama-completion" ]]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$root"
python3 -m pip install -q cmake ninja scikit-build-core >&2
if [[ ! -d "$root/src" ]]; then
  dl="$root/sdist"
  mkdir -p "$dl"
  python3 -m pip download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    -d "$dl" llama-cpp-python >&2
  tar -xzf "$dl"/llama_cpp_python-*.tar.gz -C "$root"
  mv "$root"/llama_cpp_python-*/vendor/llama.cpp "$root/src"
  rm -rf "$root"/llama_cpp_python-* "$dl"
fi

cmake -S "$root/src" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$root/build" --target "${targets[@]}" -j "$(nproc)" >&2
echo "$bin"
