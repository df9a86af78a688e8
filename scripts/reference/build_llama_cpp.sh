#!/usr/bin/env bash
# Build the peer engine llama.cpp (llama-bench, llama-quantize, llama-perplexity) for
# scripts/reference/bench_peers.sh, `s2lc bench kv --llama-perplexity` and the weight frontier.
#
#   scripts/reference/build_llama_cpp.sh      everything under ${S2LC_PEERS:-$HOME/.cache/s2lc-peers}
#
# The source is the llama.cpp that the llama-cpp-python sdist on PyPI vendors (vendor/llama.cpp), so
# only PyPI is needed; cmake and ninja come from PyPI too, into a venv of their own ($PEERS/venv).
# Then the Q4_1 SmolLM2 GGUF from $S2LC_HOME/models is requantized to F32 and F16 into $PEERS/models.
# Idempotent: every step already done is skipped. A few minutes on 2 cores. Never run in CI.
set -euo pipefail

VERSION=0.3.36                                   # llama-cpp-python release whose vendored llama.cpp we build
S2LC_HOME="${S2LC_HOME:-$HOME/.cache/s2lc}"
PEERS="${S2LC_PEERS:-$HOME/.cache/s2lc-peers}"
VENV="$PEERS/venv"
TARBALL="$PEERS/llama_cpp_python-$VERSION.tar.gz"
SRC="$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"
MODEL_IN="$S2LC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
JOBS="${JOBS:-2}"

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build_llama_cpp: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

say() { echo "build_llama_cpp: $*" >&2; }
mkdir -p "$PEERS/models"

# 1. cmake + ninja from PyPI (the machine has neither).
if [ ! -x "$VENV/bin/cmake" ] || [ ! -x "$VENV/bin/ninja" ]; then
  say "venv with cmake and ninja at $VENV"
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet cmake ninja
fi
export PATH="$VENV/bin:$PATH"                    # cmake must find this ninja

# 2. The sdist (~75 MB). A truncated download is detected by gzip -t and fetched again. pip prepares
# the sdist's metadata, which installs its build requirements (cmake, ninja, scikit-build-core):
# `--no-binary :all:` would compile those from source too (CMake itself: far too long), so only
# llama-cpp-python is forced to be the sdist.
if [ ! -f "$TARBALL" ] || ! gzip -t "$TARBALL" 2>/dev/null; then
  say "downloading llama-cpp-python==$VERSION sdist"
  rm -f "$TARBALL"
  "$VENV/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python -d "$PEERS" \
    "llama-cpp-python==$VERSION"
fi
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  say "unpacking $TARBALL"
  tar -xzf "$TARBALL" -C "$PEERS"
fi

# 3. Configure (a no-op when the cache already has these values) and build the three tools.
# LLAMA_BUILD_TOOLS (default ON for a top-level build) holds llama-bench, llama-quantize and
# llama-perplexity; the unified
# `llama` app and the server are not needed. This llama.cpp no longer has LLAMA_CURL (only a warning).
cd "$SRC"
cmake -S . -B build -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build -j "$JOBS" --target llama-bench llama-quantize llama-perplexity

# 4. F32 and F16 GGUFs from the Q4_1 file: every quantized tensor (Q8_0 embedding too) is dequantized.
# F32 is exactly the Q4_1 model (what S2LC's and PyTorch's f32 paths compute with); F16 rounds it.
if [ ! -f "$MODEL_IN" ]; then
  say "$MODEL_IN missing (run scripts/fetch-assets)"; exit 1
fi
for ty in F32 F16; do
  out="$PEERS/models/SmolLM2-135M-Instruct.$ty.gguf"
  if [ ! -f "$out" ]; then
    say "quantizing to $ty"
    "$BIN/llama-quantize" --allow-requantize "$MODEL_IN" "$out.tmp" "$ty" >"$out.log" 2>&1 \
      || { say "llama-quantize failed, see $out.log"; exit 1; }
    mv "$out.tmp" "$out"
  fi
done

echo "llama-bench:    $BIN/llama-bench"
echo "llama-quantize: $BIN/llama-quantize"
echo "llama-perplexity: $BIN/llama-perplexity"
ls -l "$PEERS"/models/*.gguf
