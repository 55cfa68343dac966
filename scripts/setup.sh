#!/usr/bin/env bash
# One-time setup on a fresh Debian/Ubuntu machine: system packages the bot and its tests use,
# then a virtualenv in .venv with the project installed. Safe to run again.
# PYTHON=/path/to/python3.11 picks the interpreter (default: python3; the project needs >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "setup: error: $*" >&2; exit 1; }

# the interpreter first: a too-old Python should not cost a long apt-get install before it is found out
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH: install Python >= 3.11 (Debian/Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); the project needs >= 3.11 (set PYTHON=/path/to/python3.11)"

APT_PACKAGES=(
  redis-server          # call state (embedded when REDIS_URL is unset) and tests
  espeak-ng flite festival sox libsndfile1   # voices for training data, fallback voice, audio tools
  festvox-kallpc16k     # festival's kal_diphone voice (a held-out test voice); only Recommended by festival
  baresip               # real SIP user agent in tests
  asterisk-core-sounds-en-wav asterisk-core-sounds-en  # real human speech for evaluation
  chromium              # admin console + softphone browser tests (Playwright drives Debian's chromium)
  prometheus            # promtool: validates scrape config and alert rules
  kamailio              # SIP dispatcher config for scale-out, tested locally
)
# `python3 -m venv` needs ensurepip, which Debian/Ubuntu ship separately (python3-venv) for their python3
if ! "$PY" -c 'import ensurepip' 2>/dev/null; then
  APT_PACKAGES+=(python3-venv)
fi

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
  || die "this script installs Debian/Ubuntu packages (no apt-get/dpkg here): install ${APT_PACKAGES[*]} yourself, or run it on Debian/Ubuntu"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing Debian packages ${missing[*]} and no sudo: as root run apt-get install ${missing[*]}"
    SUDO="sudo"
  fi
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -q || die "apt-get update failed (see above): check the network / apt sources, then run this again"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || die "could not install ${missing[*]} (apt-get said why above; on Ubuntu, chromium is a snap: install chromium-browser or Debian's chromium, then run this again)"
fi
"$PY" -c 'import ensurepip' 2>/dev/null || die "$PY cannot create virtualenvs (no ensurepip): install its venv package (e.g. apt-get install python3-venv), then run this again"

# a .venv left half-made (no pip: ensurepip was missing) or made by another Python is made again
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: .venv has no pip or an old Python: making it again" >&2
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv || die "'$PY -m venv .venv' failed (see above)"
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project and its Python dependencies into .venv (a few minutes the first time)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,train]" || die "pip could not install the project into .venv (see above)"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ok (.venv/bin/bot is the CLI; make run starts the bot)" >&2
