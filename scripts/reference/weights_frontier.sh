#!/usr/bin/env bash
# The weight frontier: bits per linear weight vs perplexity (lcet10 and the Linux docs domain) vs
# decode speed, for llama.cpp's quants and S2LC's quant-lr at several budgets, all from the same
# dequantized f32 model and scored by the same `s2lc eval` windows, in one run.
#
#   scripts/reference/weights_frontier.sh [BUDGET[:BITS[:RANKS]] ...]
#
# Each argument is a quant-lr budget in bits per linear weight, optionally with the row bit widths
# and correction ranks it may use (`3.9:3` = 3-bit rows only, the rest of the budget to
# corrections; `3.6:3:0` = 3-bit rows with no correction, the block format `3.9:3` corrects).
# Default: 4.6:4 3.9:3 3.6:3:0 3.9 3.5.
# It builds the variants (llama-quantize's types from the dequantized F32 GGUF, `s2lc compress
# --method quant-lr` at each budget) under $PEERS/frontier, then measures them all with
# `s2lc bench weights` (JSON=FILE also writes its report), llama.cpp's `llama-perplexity` scoring
# every GGUF on the same windows. Needs
# scripts/reference/build_llama_cpp.sh (llama-quantize, the F32 GGUF) and a release build.
# Bits per linear weight count every stored byte of the block linears (blocks, scales,
# correction factors); embeddings are left as each file holds them (Q8_0 in all but dense).
set -euo pipefail
cd "$(dirname "$0")/../.."

S2LC_HOME="${S2LC_HOME:-$HOME/.cache/s2lc}"
PEERS="${S2LC_PEERS:-$HOME/.cache/s2lc-peers}"
BIN="$PEERS/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
F32="$PEERS/models/SmolLM2-135M-Instruct.F32.gguf"
OUT="$PEERS/frontier"
S2LC=./target/release/s2lc
TOKENS="${TOKENS:-2048}"
TEXTS=("$S2LC_HOME/text/canterbury/lcet10.txt" "$S2LC_HOME/text/domains/linux.txt")
BUDGETS=("$@")
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=(4.6:4 3.9:3 3.6:3:0 3.9 3.5)

[ -x "$BIN/llama-quantize" ] && [ -f "$F32" ] || {
  echo "weights_frontier: run scripts/reference/build_llama_cpp.sh first" >&2; exit 1; }
[ -x "$S2LC" ] || { echo "weights_frontier: run cargo build --release first" >&2; exit 1; }
mkdir -p "$OUT"

variants=()
for ty in Q2_K Q3_K_M Q4_0 Q4_1 Q4_K_M Q5_K_M Q8_0; do
  m="$OUT/SmolLM2-135M-Instruct.$ty.gguf"
  [ -f "$m" ] || "$BIN/llama-quantize" "$F32" "$m" "$ty" >"$m.log" 2>&1
  variants+=(--variant "$m")
done
for spec in "${BUDGETS[@]}"; do
  IFS=: read -r b bits ranks <<<"$spec"
  bits="${bits:-2,3,4}"; ranks="${ranks:-0,8,16,32,64}"
  d="$OUT/quant-lr-$b-bits$bits-ranks$ranks"
  "$S2LC" compress --model "$F32" --method quant-lr --bits-per-weight "$b" --bits "$bits" \
    --ranks "$ranks" --calib-samples 32 -o "$d" >"$d.log" 2>&1
  variants+=(--variant "$d")
done
# One process: every model scored on the same windows, decode runs interleaved.
"$S2LC" bench weights --model "$F32" "${variants[@]}" --eval-tokens "$TOKENS" \
  --texts "$(IFS=,; echo "${TEXTS[*]}")" --llama-perplexity "$BIN/llama-perplexity" \
  ${JSON:+--json "$JSON"}
