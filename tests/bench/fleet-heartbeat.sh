#!/usr/bin/env bash
# Benchmark: N simulated agents heartbeating against one coordinator on loopback.
# Prints heartbeat latency percentiles, enrollment rate, and the coordinator's CPU and
# peak RSS. Run it on a quiet machine. Usage: tests/bench/fleet-heartbeat.sh [N] [SECONDS]
set -euo pipefail
agents=${1:-1000}
seconds=${2:-60}
cd "$(dirname "$0")/../.."
cargo build --release --bins -q
work=$(mktemp -d)
trap 'kill $coordinator_pid 2>/dev/null || true; rm -rf "$work"' EXIT
grpc=127.0.0.1:17443
bin=target/release
$bin/nanofleet-coordinator --data-dir "$work/coord" --grpc-listen $grpc --http-listen 127.0.0.1:17480 init >/dev/null
RUST_LOG=warn $bin/nanofleet-coordinator --data-dir "$work/coord" --grpc-listen $grpc \
  --http-listen 127.0.0.1:17480 --heartbeat-interval-secs 10 serve 2>"$work/coordinator.log" &
coordinator_pid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:17480/healthz >/dev/null && break; sleep 0.2; done
echo "nanofleet fleet heartbeat benchmark: $agents agents, 10 s interval, $seconds s measured, $(nproc) cores"
$bin/nanofleet-fleetsim --coordinator "https://$grpc" --operator-dir "$work/coord/operator" \
  --agents "$agents" --duration-secs "$seconds" --coordinator-pid $coordinator_pid
