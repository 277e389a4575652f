# Sourced by the check scripts: python3 -m venv, installing Debian's python3-venv first
# where it is missing.
make_venv() {
  python3 -m venv "$1" >/dev/null 2>&1 && return 0
  rm -rf "$1"
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
    && python3 -m venv "$1"
}

# install_tools VENV TOOL REQUIREMENT...: (re)installs the pinned requirements into VENV when
# VENV/bin/TOOL is missing or the venv was made for other pins; calls `fail` on error.
install_tools() {
  local venv=$1 tool=$2
  shift 2
  local stamp="$venv/.nanofleet-requirements"
  if [ ! -x "$venv/bin/$tool" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$*" ]; then
    echo "==> installing $* into $venv"
    make_venv "$venv" || fail "cannot create a virtual environment at $venv (python3-venv missing?)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" \
      || fail "pip install of $* failed"
    echo "$*" >"$stamp"
  fi
}
