#!/bin/sh
# Install the system packages umlipft's build and label stages use: Packmol (umlipft build)
# and CP2K with cp2k_shell (umlipft label --calculator cp2k); and Chromium, with which the tests
# render the workflow report in a headless browser. Debian/Ubuntu only.
# As root this installs them with apt-get; otherwise it prints the command to run and exits 0,
# so a user-level setup can go on (the stages say what is missing when they need it).
set -eu

PACKAGES="packmol cp2k chromium"

missing=""
command -v packmol >/dev/null 2>&1 || missing="$missing packmol"
if ! command -v cp2k_shell >/dev/null 2>&1 && ! command -v cp2k_shell.psmp >/dev/null 2>&1 \
   && ! command -v cp2k.psmp >/dev/null 2>&1; then
    missing="$missing cp2k"
fi
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -z "$missing" ]; then
    echo "system packages present: packmol, cp2k, chromium"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing:$missing. No apt-get here: install Packmol, CP2K (with cp2k_shell) and Chromium with" \
         "your system's package manager or from source, and put them on PATH." >&2
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $PACKAGES >/dev/null
    echo "installed:$missing"
else
    echo "missing:$missing. Run as root:"
    echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y $PACKAGES"
fi
