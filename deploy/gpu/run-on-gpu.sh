#!/usr/bin/env bash
# The GPU check, run on the GPU machine from the directory deploy/gpu/pack.sh staged (it needs
# the NVIDIA driver for CUDA 13.0 or newer, the CUDA 13 runtime libraries, and for the
# llama.cpp comparison a CUDA toolkit with cmake and ninja; no Rust, no network):
#   1. greedy parity: the first 16 greedy tokens on the GPU against the CPU, for the greedy
#      prompts of the llama.cpp parity test (device_parity), beside llama.cpp's own CPU/GPU
#      agreement on the same prompts (its CPU output as the test data recorded it, its GPU
#      output from llama-completion built here with CUDA, -ngl 99, greedy);
#   2. the local API served from the GPU: `nanofleet-agent --inference-device cuda serve`,
#      then /v1/models (which names the device), a chat completion and a streamed one;
#   3. a benchmark on one GGUF: nanofleet on the GPU and on the CPU, and llama.cpp's
#      llama-bench built here with CUDA (all layers on the GPU), in the same run; printed as
#      one table with nanofleet/llama.cpp ratios.
# Writes its logs to OUT (default: a temporary directory).
#
# Usage: run-on-gpu.sh [DIR]   env: OUT, BENCH_PROMPT (512), BENCH_GEN (128), BENCH_REPS (3)
set -euo pipefail

dir="$(cd "${1:-$(dirname "$0")}" && pwd)"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
n_prompt="${BENCH_PROMPT:-512}"
n_gen="${BENCH_GEN:-128}"
reps="${BENCH_REPS:-3}"
cd "$dir"

# Parts from a size-limited copy (pack.sh with PART_MIB): join and unpack them once.
if compgen -G "bundle.tar.part*" >/dev/null; then
  cat bundle.tar.part* | tar -xf - && rm bundle.tar.part*
fi
if [[ -f bin.tar.xz ]]; then
  tar -xJf bin.tar.xz && rm bin.tar.xz
fi
sha256sum -c model.sha256 >&2
model="$dir/$(cut -d' ' -f3 model.sha256)"

for lib in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64; do
  [[ -d "$lib" ]] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export PATH="/usr/local/cuda/bin:$(ls -d /usr/local/cuda-13*/bin 2>/dev/null | head -1):$PATH"
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
echo "GPU: $gpu; CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

# llama.cpp with CUDA builds in the background while the API check runs.
llama_log="$out/llama-build.log"
llama_bin="$dir/llama.cpp/build/bin"
(
  if [[ -f llama-src.tar.xz && ! -x "$llama_bin/llama-completion" ]]; then
    mkdir -p llama.cpp && tar -xJf llama-src.tar.xz -C llama.cpp
    cmake -S llama.cpp/src -B llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}" -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build llama.cpp/build --target llama-bench llama-completion -j "$(nproc)"
  fi
) >"$llama_log" 2>&1 &
llama_build=$!

echo
echo "## 1. The local API served from the GPU"
data="$(mktemp -d)"
./nanofleet-agent --data-dir "$data" --inference-device cuda --api-listen 127.0.0.1:0 \
  serve --model "$model" --name smollm2 >"$out/agent.log" 2>&1 &
agent=$!
for _ in $(seq 120); do [[ -s "$data/api.addr" ]] && break; sleep 0.5; done
api="http://$(cat "$data/api.addr")"
curl -sf "$api/v1/models" | tee "$out/models.json"
echo
curl -sf "$api/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":24,"temperature":0}' |
  tee "$out/chat.json"
echo
curl -sfN "$api/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model":"smollm2","messages":[{"role":"user","content":"Count to five."}],"max_tokens":16,"temperature":0,"stream":true}' \
  >"$out/stream.txt"
echo "streamed: $(grep -c '^data: {' "$out/stream.txt") chunks, then $(grep -c '^data: \[DONE\]' "$out/stream.txt") [DONE]"
kill "$agent"
wait "$agent" || true
grep -m2 -E "models run on|proven" "$out/agent.log" || true

echo
echo "## 2. Greedy parity, GPU against CPU"
llama_texts=()
if wait "$llama_build" && [[ -x "$llama_bin/llama-completion" ]]; then
  # The settings make-testdata.sh recorded llama.cpp's CPU output with, on the GPU.
  python3 - "$model" "$llama_bin/llama-completion" smollm2-llama-cpp.json \
    >"$out/llama-gpu-texts.json" <<'PY'
import json, subprocess, sys
model, completion, testdata = sys.argv[1:4]
texts = {}
for case in json.load(open(testdata))["greedy"]:
    out = subprocess.run(
        [completion, "-m", model, "-p", case["prompt"], "-n", str(case["n_predict"]),
         "--temp", "0", "--top-k", "1", "--repeat-penalty", "1.0", "-s", "0", "-ngl", "99",
         "-no-cnv", "--no-display-prompt", "--no-escape", "--no-warmup"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL).stdout.decode()
    texts[case["name"]] = out.removesuffix("\n\n").removesuffix(" [end of text]\n")
json.dump(texts, sys.stdout, ensure_ascii=False, indent=1)
PY
  llama_texts=("$out/llama-gpu-texts.json")
else
  echo "llama.cpp did not build, so its GPU output is not compared; the tail of its log:" >&2
  tail -20 "$llama_log" >&2
fi
./device_parity "$model" cuda 16 "${llama_texts[@]}" | tee "$out/parity.txt"

echo
echo "## 3. Benchmark: pp$n_prompt and tg$n_gen, $reps repetitions"
./bench "$model" 2 "$n_prompt" "$n_gen" "$reps" cuda >"$out/bench-cuda.json"
./bench "$model" "$(nproc)" "$n_prompt" "$n_gen" "$reps" cpu >"$out/bench-cpu.json"
llama_json="$out/llama-bench.json"
if [[ -x "$llama_bin/llama-bench" ]]; then
  "$llama_bin/llama-bench" -m "$model" -p "$n_prompt" -n "$n_gen" -r "$reps" -ngl 99 \
    -o json >"$llama_json" 2>"$out/llama-bench.err"
else
  echo "[]" >"$llama_json"
fi
python3 - "$out" "$gpu" <<'PY'
import json, sys
out, gpu = sys.argv[1], sys.argv[2]
ours_gpu = json.load(open(f"{out}/bench-cuda.json"))
ours_cpu = json.load(open(f"{out}/bench-cpu.json"))
llama = json.load(open(f"{out}/llama-bench.json"))
pp = next((r for r in llama if r["n_prompt"] > 0 and r["n_gen"] == 0), None)
tg = next((r for r in llama if r["n_gen"] > 0 and r["n_prompt"] == 0), None)
rows = [
    ("nanofleet", ours_gpu["device"], ours_gpu["pp_tps"], ours_gpu["tg_tps"], ours_gpu["load_s"]),
    ("nanofleet", f"cpu, {ours_cpu['threads']} threads", ours_cpu["pp_tps"], ours_cpu["tg_tps"], ours_cpu["load_s"]),
]
if pp and tg:
    rows.append(("llama.cpp", f"{gpu.split(',')[0]} (-ngl 99)", pp["avg_ts"], tg["avg_ts"], None))
print(f"| engine | device | pp{ours_gpu['n_prompt']} tok/s | tg{ours_gpu['n_gen']} tok/s | load s |")
print("|---|---|---|---|---|")
for engine, device, p, t, load in rows:
    print(f"| {engine} | {device} | {p:.1f} | {t:.1f} | {'' if load is None else f'{load:.3f}'} |")
if pp and tg:
    print(f"| ratio nanofleet GPU / llama.cpp GPU | | {ours_gpu['pp_tps'] / pp['avg_ts']:.2f} | {ours_gpu['tg_tps'] / tg['avg_ts']:.2f} | |")
PY
