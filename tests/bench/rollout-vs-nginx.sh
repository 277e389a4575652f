#!/usr/bin/env bash
# Benchmark: roll the reference model (about 98 MB) out to N agents on loopback with
# nanofleet, and in the same run serve the same file with nginx to N concurrent curl
# clients. Prints both wall times, the ratio, and the coordinator's peak RSS.
# nanofleet's time includes TLS, per-chunk and whole-file verification on every agent
# and the atomic, durable activation; curl only writes the bytes to disk. The agents run
# store-only (--serve-models false): like curl they load no model, and they start no
# local API (twenty of them would contend for its one port).
# Usage: tests/bench/rollout-vs-nginx.sh [N]   (default 20). Run on a quiet machine.
# Builds into and runs from $CARGO_TARGET_DIR when set (default: target/).
set -euo pipefail
agents=${1:-20}
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
$bin/nanofleet model publish "$model" --name smollm2-135m-instruct --version 1.0.0 --key "$work/keys/publisher.key" >/dev/null
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

# The timed loop reads the first line of the CLI's text output ("rollout ID ARTIFACT
# STATE") with awk rather than parsing JSON with python: on a small machine a python
# start per poll takes CPU time from the rollout it measures.
start=$(date +%s.%N)
id=$($bin/nanofleet rollout create --artifact smollm2-135m-instruct@1.0.0 --waves 100% | awk 'NR == 1 {print $2}')
while :; do
  state=$($bin/nanofleet rollout status "$id" | awk 'NR == 1 {print $4}')
  [ "$state" = running ] || break
  sleep 0.05
done
nanofleet_secs=$(echo "$(date +%s.%N) - $start" | bc)
[ "$state" = completed ] || { echo "rollout ended $state"; exit 1; }
peak_kib=$(awk '/VmHWM/ {print $2}' /proc/$coordinator/status)

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
}
CONF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
for _ in $(seq 100); do
  if curl -s -o /dev/null http://127.0.0.1:18081/; then break; fi
  sleep 0.1
done
sync
start=$(date +%s.%N)
clients=()
for i in $(seq "$agents"); do
  curl -s -o "$work/curl/$i.gguf" http://127.0.0.1:18081/model.gguf &
  clients+=($!)
done
wait "${clients[@]}"
nginx_secs=$(echo "$(date +%s.%N) - $start" | bc)
for i in $(seq "$agents"); do
  [ "$(stat -c %s "$work/curl/$i.gguf")" = "$(stat -c %s "$model")" ] || { echo "curl client $i got a short file"; exit 1; }
done

size=$(stat -c %s "$model")
printf '| %s | %s |\n|---|---|\n' "metric" "value"
printf '| file | %s (%d bytes) |\n' "$(basename "$model")" "$size"
printf '| clients | %d, %d cores |\n' "$agents" "$(nproc)"
printf '| nanofleet rollout (mTLS, verify, activate) | %.2f s |\n' "$nanofleet_secs"
printf '| nginx + curl (plain HTTP, sendfile) | %.2f s |\n' "$nginx_secs"
printf '| ratio nanofleet / nginx | %.2f |\n' "$(echo "$nanofleet_secs / $nginx_secs" | bc -l)"
printf '| coordinator peak RSS | %.1f MiB |\n' "$(echo "$peak_kib / 1024" | bc -l)"
