#!/usr/bin/env bash
# Build llama.cpp's benchmark tools (the peer engine) from the llama.cpp vendored in the llama-cpp-python sdist.
#
#   benchmarks/build_llama_cpp.sh            # idempotent: does nothing if the binaries exist
#   LLAMA_CPP_DIR=/some/dir benchmarks/build_llama_cpp.sh
#   LLAMA_CPP_TARGETS="llama-bench llama-cli" benchmarks/build_llama_cpp.sh
#
# Everything (sdist, sources, build tree, binaries) lives outside the repo, in
# ${LLAMA_CPP_DIR:-$HOME/.cache/shardserve/llama.cpp}. The binaries end up in $LLAMA_CPP_DIR/build-<version>/bin,
# which benchmarks/llama_cpp.py finds by itself. No network is used except PyPI (pip download of the sdist):
# no curl / OpenSSL / prebuilt web UI / git.
#
# Default targets: llama-bench llama-batched-bench llama-quantize llama-perplexity. llama-cli is left out by
# default: in this llama.cpp version it is only defined with LLAMA_BUILD_SERVER=ON and links the whole server
# (llama-server-impl + web UI assets), roughly doubling the build on 2 cores; ask for it with
# LLAMA_CPP_TARGETS="... llama-cli" (then the server is configured in, with the prebuilt UI download off).
set -euo pipefail

# Pinned: llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG.md).
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_COMMIT=0c1e57098

DIR=${LLAMA_CPP_DIR:-$HOME/.cache/shardserve/llama.cpp}
TARGETS=${LLAMA_CPP_TARGETS:-llama-bench llama-batched-bench llama-quantize llama-perplexity}
JOBS=${LLAMA_CPP_JOBS:-2}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

SRC="$DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
BUILD="$DIR/build-$LLAMA_CPP_PYTHON_VERSION"
BIN="$BUILD/bin"

missing=()
for t in $TARGETS; do [[ -x "$BIN/$t" ]] || missing+=("$t"); done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, llama.cpp@$LLAMA_CPP_COMMIT) already built: $BIN"
    for t in $TARGETS; do echo "  $BIN/$t"; done
    exit 0
fi

mkdir -p "$DIR/src"
SDIST="$DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist into $DIR"
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DIR"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    echo "unpacking $SDIST"
    tar -xzf "$SDIST" -C "$DIR/src"
fi

server=OFF
for t in $TARGETS; do [[ "$t" == llama-cli || "$t" == llama-server ]] && server=ON; done

# LLAMA_BUILD_COMMIT/NUMBER given explicitly: the sdist has no .git, and build-info.cmake would otherwise ask git
# (and pick up whatever repository encloses $DIR, if any).
cmake -S "$SRC" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DGGML_OPENMP=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_SERVER=$server \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT" \
    -DLLAMA_BUILD_NUMBER=0

# shellcheck disable=SC2086
nice -n 10 cmake --build "$BUILD" --config Release -j "$JOBS" --target $TARGETS

# The sdist carries the submodule's (shallow) git dir, so the full hash and date are usually readable.
full_commit=$(git -C "$SRC" log -1 --format='%H %ci' 2>/dev/null || echo "$LLAMA_CPP_COMMIT")
cat > "$DIR/VERSION-$LLAMA_CPP_PYTHON_VERSION.txt" <<EOF
llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist from PyPI)
llama.cpp: ggml-org/llama.cpp@$full_commit (vendor/llama.cpp)
cmake: -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
compiler: $(${CXX:-c++} --version | head -1)
EOF

echo "llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, llama.cpp@$LLAMA_CPP_COMMIT) built: $BIN"
for t in $TARGETS; do echo "  $BIN/$t"; done
