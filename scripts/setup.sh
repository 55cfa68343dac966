#!/usr/bin/env bash
# One-time setup on a fresh Debian/Ubuntu machine: system packages the bot and its tests use,
# then a virtualenv in .venv with the project installed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

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

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test,train]"
  touch "$stamp"
fi
