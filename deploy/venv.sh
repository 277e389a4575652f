# Sourced by the check scripts: python3 -m venv, installing Debian's python3-venv first
# where it is missing.
make_venv() {
  python3 -m venv "$1" >/dev/null 2>&1 && return 0
  rm -rf "$1"
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
    && python3 -m venv "$1"
}
