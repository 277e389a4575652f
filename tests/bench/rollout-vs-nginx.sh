#!/usr/bin/env bash
# Benchmark: roll the reference model (about 98 MB) out to N agents on loopback with
# nanofleet, and in the same run serve the same file with nginx to N concurrent curl
# clients (plain HTTP with sendfile, the issue's yardstick, and HTTPS with a sha256 check
# of each file, what serving models with nginx takes). Prints the wall times, the
# ratios, and the coordinator's peak RSS.
# nanofleet's time includes mutual TLS, per-chunk and whole-file verification on every
# agent and the atomic, durable activation; plain curl only writes the bytes to the page
# cache. The agents run store-only (--serve-models false): like curl they load no model,
# and they start no local API (twenty of them would contend for its one port).
# Each of the three runs BENCH_REPS times (default 5), taken in turn, each after `sync`
# so that none starts behind another's writeback; the table has the medians, and the
# ratios are of the medians. Each nanofleet run rolls out a new version of the same file
# (the coordinator stores its chunks once), so every agent downloads it whole again.
# Usage: tests/bench/rollout-vs-nginx.sh [N]   (default 20). Run on a quiet machine.
# Builds into and runs from $CARGO_TARGET_DIR when set (default: target/).
set -euo pipefail
agents=${1:-20}
reps=${BENCH_REPS:-5}
cd "$(dirname "$0")/../.."
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
cargo build --release --bins -q
model=$(deploy/fetch-model.sh)
# fetch-model.sh prints the first SmolLM2 GGUF it finds; other quantizations may share
# its directory, and the benchmark is defined on the Q4_1 file.
reference="$(dirname "$model")/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$reference" ] && model=$reference
bin=${CARGO_TARGET_DIR:-$PWD/target}/release
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
grpc=127.0.0.1:18443
http=127.0.0.1:18480

$bin/nanofleet-coordinator --data-dir "$work/c" --grpc-listen $grpc --http-listen $http init >/dev/null
$bin/nanofleet model keygen --out "$work/keys" >/dev/null
$bin/nanofleet-coordinator --data-dir "$work/c" trust add-key --key "$work/keys/publisher.pub" --names 'smollm2-*' >/dev/null
RUST_LOG=warn $bin/nanofleet-coordinator --data-dir "$work/c" --grpc-listen $grpc --http-listen $http \
  --heartbeat-interval-secs 2 serve 2>"$work/coordinator.log" &
coordinator=$!
pids+=($coordinator)
for _ in $(seq 100); do curl -sf "http://$http/healthz" >/dev/null && break; sleep 0.1; done
export NANOFLEET_CLI_CONFIG="$work/c/operator/cli.toml"
for rep in $(seq "$reps"); do
  $bin/nanofleet model publish "$model" --name smollm2-135m-instruct --version "1.0.$rep" \
    --key "$work/keys/publisher.key" >/dev/null
done
for i in $(seq "$agents"); do
  token=$($bin/nanofleet token create --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  RUST_LOG=warn $bin/nanofleet-agent --data-dir "$work/a$i" --coordinator "https://$grpc" --ca-cert "$work/c/ca.crt" \
    --token "$token" --trust-policy "$work/c/trust.json" --serve-models false run 2>"$work/a$i.log" &
  pids+=($!)
done
for _ in $(seq 300); do
  online=$($bin/nanofleet nodes list --json | python3 -c 'import json,sys; print(sum(n["online"] for n in json.load(sys.stdin)))')
  [ "$online" = "$agents" ] && break
  sleep 0.2
done

# The id is the second word of the CLI's first line ("rollout ID ARTIFACT STATE"), read
# with awk rather than python, whose start would take CPU time from the rollout; `status
# --wait` polls over one connection and fails unless the rollout completed.
rollout_once() {
  local id start
  sync
  start=$(date +%s.%N)
  id=$($bin/nanofleet rollout create --artifact "smollm2-135m-instruct@1.0.$1" --waves 100% | awk 'NR == 1 {print $2}')
  $bin/nanofleet rollout status "$id" --wait >"$work/rollout-$1.txt" || { cat "$work/rollout-$1.txt" >&2; exit 1; }
  echo "$(date +%s.%N) - $start" | bc
}

mkdir -p "$work/www" "$work/nginx/logs" "$work/curl"
ln "$model" "$work/www/model.gguf" 2>/dev/null || cp "$model" "$work/www/model.gguf"
cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 2;
daemon off;
user root;
error_log $work/nginx/logs/error.log;
pid $work/nginx/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  server { listen 127.0.0.1:18081; root $work/www; }
  server {
    listen 127.0.0.1:18082 ssl;
    ssl_protocols TLSv1.3;
    ssl_certificate $work/c/server.crt;
    ssl_certificate_key $work/c/server.key;
    root $work/www;
  }
}
CONF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
for _ in $(seq 100); do
  if curl -s -o /dev/null http://127.0.0.1:18081/; then break; fi
  sleep 0.1
done
# nginx_once [tls]: the N curl clients at once; with `tls`, over HTTPS (TLS 1.3, the
# coordinator's server certificate, checked against the fleet CA), each client then
# checking its file's sha256, as a user of nginx for model files would.
nginx_once() {
  local start clients=() url=http://127.0.0.1:18081/model.gguf fetch
  fetch() { curl -s -o "$1" "$url"; }
  if [ "${1:-}" = tls ]; then
    url=https://127.0.0.1:18082/model.gguf
    fetch() { curl -s --cacert "$work/c/ca.crt" -o "$1" "$url" && [ "$(sha256sum <"$1")" = "$want" ]; }
  fi
  rm -f "$work"/curl/*.gguf
  sync
  start=$(date +%s.%N)
  for i in $(seq "$agents"); do
    fetch "$work/curl/$i.gguf" &
    clients+=($!)
  done
  wait "${clients[@]}" || { echo "a curl client failed" >&2; exit 1; }
  echo "$(date +%s.%N) - $start" | bc
  for i in $(seq "$agents"); do
    [ "$(stat -c %s "$work/curl/$i.gguf")" = "$(stat -c %s "$model")" ] || { echo "curl client $i got a short file" >&2; exit 1; }
  done
}
want=$(sha256sum <"$model")

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

nanofleet_runs=()
nginx_runs=()
nginx_tls_runs=()
for rep in $(seq "$reps"); do
  secs=$(rollout_once "$rep")
  nanofleet_runs+=("$secs")
  secs=$(nginx_once)
  nginx_runs+=("$secs")
  secs=$(nginx_once tls)
  nginx_tls_runs+=("$secs")
done
peak_kib=$(awk '/VmHWM/ {print $2}' /proc/$coordinator/status)
nanofleet_secs=$(printf '%s\n' "${nanofleet_runs[@]}" | median)
nginx_secs=$(printf '%s\n' "${nginx_runs[@]}" | median)
nginx_tls_secs=$(printf '%s\n' "${nginx_tls_runs[@]}" | median)

size=$(stat -c %s "$model")
printf '| %s | %s |\n|---|---|\n' "metric" "value"
printf '| file | %s (%d bytes) |\n' "$(basename "$model")" "$size"
printf '| clients | %d, %d cores |\n' "$agents" "$(nproc)"
printf '| runs per side (medians below) | %d |\n' "$reps"
printf '| nanofleet rollout (mTLS, verify, activate) | %.2f s (runs: %s) |\n' "$nanofleet_secs" "$(printf '%.2f ' "${nanofleet_runs[@]}")"
printf '| nginx + curl (plain HTTP, sendfile) | %.2f s (runs: %s) |\n' "$nginx_secs" "$(printf '%.2f ' "${nginx_runs[@]}")"
printf '| nginx + curl (HTTPS, then sha256sum) | %.2f s (runs: %s) |\n' "$nginx_tls_secs" "$(printf '%.2f ' "${nginx_tls_runs[@]}")"
printf '| ratio nanofleet / nginx (plain HTTP; the target) | %.2f |\n' "$(echo "$nanofleet_secs / $nginx_secs" | bc -l)"
printf '| ratio nanofleet / nginx (HTTPS + sha256sum) | %.2f |\n' "$(echo "$nanofleet_secs / $nginx_tls_secs" | bc -l)"
printf '| coordinator peak RSS | %.1f MiB |\n' "$(echo "$peak_kib / 1024" | bc -l)"
