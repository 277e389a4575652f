#!/usr/bin/env bash
# Benchmark (issue 8): N simulated agents (nanofleet-fleetsim, one process; each with its
# own key, token, mTLS connection and command stream) against one release coordinator on
# loopback. They enroll, heartbeat every 10 s, and after SECONDS of steady heartbeats
# receive one rollout: a small signed model published here with the operator CLI, rolled
# out in waves of 1%, 10% and 100% of the fleet, each wave starting once the one before
# reports healthy, at most FLEETSIM_MAX_PER_SECOND agents assigned a second. Every agent
# verifies the signed manifest against its own trust policy, fetches and checks the
# chunks, activates the version and reports its health, with the agent's own code. Prints the enrollment rate, heartbeat p50/p99, the time
# until every agent has the assignment and until the rollout is complete, the
# coordinator's CPU and peak RSS, with the targets beside them; exits non-zero when one
# is missed. Run it on a quiet machine.
#
# The rollout is paced (`--max-per-second`, FLEETSIM_MAX_PER_SECOND, default 400 agents a
# second): each agent's part of a rollout costs about 2 ms of CPU here, coordinator and
# simulated agent together, so an unpaced 10,000-node wave fills both cores for several
# seconds and every heartbeat in that time waits; 0 rolls each wave out at once.
#
# Usage: tests/bench/fleet-sim.sh [N (10000)] [SECONDS (60)]
# FLEETSIM_WAVES (default 1,10,100) changes the wave plan.
set -euo pipefail
agents=${1:-10000}
seconds=${2:-60}
waves=${FLEETSIM_WAVES:-1,10,100}
pace=${FLEETSIM_MAX_PER_SECOND:-400}
cd "$(dirname "$0")/../.."
cargo build --release -q -p nanofleet-coordinator -p nanofleet-agent \
  --bin nanofleet-coordinator --bin nanofleet --bin nanofleet-fleetsim
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
# The simulated agents' disks: in memory where /dev/shm allows, so that their writes and
# fsyncs do not queue behind (or ahead of) the coordinator's on the one disk here.
agent_disks=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
trap 'kill ${coordinator_pid:-} 2>/dev/null || true; rm -rf "$work" "$agent_disks"' EXIT
grpc=127.0.0.1:17443
http=127.0.0.1:17480
coordinator=("$bin/nanofleet-coordinator" --data-dir "$work/coord" --grpc-listen $grpc
  --http-listen $http)
"${coordinator[@]}" init >/dev/null
# A publisher key, trusted by the coordinator and by the simulated agents' own policy.
"$bin/nanofleet" model keygen --out "$work/publisher" >/dev/null
for policy_dir in "$work/coord" "$work/agent-trust"; do
  "$bin/nanofleet-coordinator" --data-dir "$policy_dir" trust add-key \
    --key "$work/publisher/publisher.pub" --names fleetsim-model >/dev/null
done
RUST_LOG=warn "${coordinator[@]}" --heartbeat-interval-secs 10 serve >/dev/null \
  2>"$work/coordinator.log" &
coordinator_pid=$!
for _ in $(seq 50); do curl -sf "http://$http/healthz" >/dev/null && break; sleep 0.2; done
"$bin/nanofleet-fleetsim" sample-model "$work/model.gguf"
"$bin/nanofleet" --config "$work/coord/operator/cli.toml" model publish "$work/model.gguf" \
  --name fleetsim-model --version 1.0.0 --key "$work/publisher/publisher.key" \
  --chunk-size 4096 >/dev/null
echo "nanofleet fleet benchmark: $agents agents, 10 s heartbeat interval, $seconds s steady," \
  "then one rollout in waves of $waves (percent); $(nproc) cores"
# One process holds every simulated agent's connection and, during the last wave, thousands
# of artifact files at once: more descriptors than a default hard limit (often 20,000) allows.
# Raising the hard limit needs root; the simulator raises its soft limit to the hard one.
ulimit -Hn 1048576 2>/dev/null || true
"$bin/nanofleet-fleetsim" run --coordinator "https://$grpc" --operator-dir "$work/coord/operator" \
  --agents "$agents" --duration-secs "$seconds" --coordinator-pid $coordinator_pid \
  --rollout fleetsim-model@1.0.0 --waves "$waves" --max-per-second "$pace" \
  --trust-policy "$work/agent-trust/trust.json" --artifact-dir "$agent_disks"
