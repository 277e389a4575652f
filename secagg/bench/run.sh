#!/usr/bin/env bash
# Runs the nanofleet SecAgg+ benchmark and Flower's SecAgg+ (flwr 1.41, in-process, no
# transport) at equal parameters, one process per configuration and repetition so that
# peak memory is per configuration, and prints both with the ratios nanofleet/Flower.
# Each configuration runs BENCH_REPS times on each side, in turn; the table shows the
# medians of the times and the largest peak memory.
#
#   FLWR_VENV   virtualenv with flwr (created with pip if missing)
#   BENCH_REPS  repetitions per configuration (default 5)
#
# Usage: run.sh ["N D K DROP_PERCENT" ...]   (default: the eight configurations below)
#   CARGO_TARGET_DIR is honoured by cargo as usual.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${FLWR_VENV:-$HOME/.cache/nanofleet/flwr-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import flwr' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'flwr==1.41.*'
fi
"$venv/bin/python" -c 'import flwr; print("flwr", flwr.__version__)'
cargo bench -p nanofleet-secagg --bench secagg --no-run --quiet

configs=(
    "10 100000 10 0" "10 100000 10 10" "10 1000000 10 0" "10 1000000 10 10"
    "100 100000 21 0" "100 100000 21 10" "100 1000000 21 0" "100 1000000 21 10"
)
# Arguments, each "N D K DROP_PERCENT", run those configurations instead.
if [ "$#" -gt 0 ]; then
    configs=("$@")
fi
reps="${BENCH_REPS:-5}"
results="$(mktemp)"
for config in "${configs[@]}"; do
    for _ in $(seq "$reps"); do
        # shellcheck disable=SC2086
        cargo bench -p nanofleet-secagg --bench secagg --quiet -- $config | grep '^RESULT' >>"$results"
        # shellcheck disable=SC2086
        "$venv/bin/python" "$here/flower_secaggplus.py" $config | grep '^RESULT' >>"$results"
    done
done

echo "load average before/after: see uptime; $(uptime)"
echo "medians of $reps runs per configuration and side"
awk '
function median(list,    v, m, i, j, t) {
  m = split(list, v, " ")
  for (i = 2; i <= m; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] + 0 > t + 0; j--) v[j + 1] = v[j]; v[j + 1] = t }
  return m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
}
{ key = $3 " " $4 " " $5 " " $6; clients[$2, key] = clients[$2, key] " " $7;
  servers[$2, key] = servers[$2, key] " " $8; if ($9 > mem[$2, key]) mem[$2, key] = $9;
  if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
END {
  for (k in clients) client[k] = median(clients[k])
  for (k in servers) server[k] = median(servers[k])
  printf "%4s %8s %3s %4s | %10s %10s %8s | %10s %10s %8s | %12s %12s\n", "N", "d", "k", "drop",
         "nf client", "nf server", "nf MiB", "fl client", "fl server", "fl MiB", "client x", "server x"
  for (i = 1; i <= n; i++) {
    key = order[i]; split(key, p, " ")
    printf "%4d %8d %3d %3d%% | %9.4fs %9.4fs %8.1f | %9.4fs %9.4fs %8.1f | %11.1fx %11.1fx\n",
      p[1], p[2], p[3], p[4],
      client["nanofleet", key], server["nanofleet", key], mem["nanofleet", key],
      client["flower", key], server["flower", key], mem["flower", key],
      client["flower", key] / client["nanofleet", key], server["flower", key] / server["nanofleet", key]
  }
  print "client x / server x: Flower time divided by nanofleet time (higher is better for nanofleet)"
}' "$results"
rm -f "$results"
