#!/usr/bin/env bash
# The agent's footprint on a device: the stripped binary of the `device` profile, and its
# resident memory once enrolled and idle (session and heartbeats running, telemetry on, no
# model loaded), read from /proc after it has settled.
# Usage: tests/bench/agent-footprint.sh [SETTLE_SECONDS]
set -euo pipefail
settle=${1:-20}
cd "$(dirname "$0")/../.."
cargo build --bins -q
cargo build --profile device -p nanofleet-agent --bin nanofleet-agent -q
work=$(mktemp -d)
trap 'kill $coordinator_pid $agent_pid 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT
bin=target/debug
grpc=127.0.0.1:17543
http=127.0.0.1:17580
$bin/nanofleet-coordinator --data-dir "$work/coord" --grpc-listen $grpc --http-listen $http init >/dev/null
RUST_LOG=warn $bin/nanofleet-coordinator --data-dir "$work/coord" --grpc-listen $grpc \
  --http-listen $http --heartbeat-interval-secs 2 serve 2>"$work/coordinator.log" &
coordinator_pid=$!
for _ in $(seq 50); do curl -sf "http://$http/healthz" >/dev/null && break; sleep 0.2; done
token=$(NANOFLEET_CLI_CONFIG="$work/coord/operator/cli.toml" $bin/nanofleet token create --ttl 10m --json \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
agent=target/device/nanofleet-agent
RUST_LOG=warn $agent --data-dir "$work/agent" --coordinator "https://$grpc" \
  --ca-cert "$work/coord/ca.crt" --token "$token" --api-listen 127.0.0.1:0 \
  --telemetry-interval-secs 2 run 2>"$work/agent.log" &
agent_pid=$!
sleep "$settle"
[ -f "$work/agent/node.crt" ] || { echo "the agent did not enroll:"; cat "$work/agent.log"; exit 1; }
rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$agent_pid/status")
hwm_kib=$(awk '/^VmHWM/ {print $2}' "/proc/$agent_pid/status")
size=$(stat -c %s "$agent")
echo "nanofleet-agent footprint ($(uname -m), device profile, enrolled and idle ${settle} s, no model)"
printf '  %-28s %8.1f MiB\n' "binary, stripped" "$(echo "$size / 1048576" | bc -l)"
printf '  %-28s %8.1f MiB\n' "resident memory now" "$(echo "$rss_kib / 1024" | bc -l)"
printf '  %-28s %8.1f MiB\n' "resident memory peak" "$(echo "$hwm_kib / 1024" | bc -l)"
