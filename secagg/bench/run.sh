#!/usr/bin/env bash
# Runs the nanofleet SecAgg+ benchmark and Flower's SecAgg+ (flwr 1.41, in-process, no
# transport) at equal parameters, one process per configuration so that peak memory is
# per configuration, and prints both with the ratios nanofleet/Flower.
#
#   FLWR_VENV   virtualenv with flwr (created with pip if missing)
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
results="$(mktemp)"
for config in "${configs[@]}"; do
    # shellcheck disable=SC2086
    cargo bench -p nanofleet-secagg --bench secagg --quiet -- $config | grep '^RESULT' >>"$results"
    # shellcheck disable=SC2086
    "$venv/bin/python" "$here/flower_secaggplus.py" $config | grep '^RESULT' >>"$results"
done

echo "load average before/after: see uptime; $(uptime)"
awk '
{ key = $3 " " $4 " " $5 " " $6; client[$2, key] = $7; server[$2, key] = $8; mem[$2, key] = $9;
  if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
END {
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
