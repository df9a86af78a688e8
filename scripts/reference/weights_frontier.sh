#!/usr/bin/env bash
# The weight frontier: bits per linear weight vs perplexity (lcet10 and the Linux docs domain) vs
# decode speed, for llama.cpp's quants and S2LC's quant-lr at several budgets, all from the same
# dequantized f32 model and scored by the same `s2lc eval` windows, in one run.
#
#   scripts/reference/weights_frontier.sh [BUDGET[:BITS] ...]
#
# Each argument is a quant-lr budget in bits per linear weight, optionally with the row bit widths
# it may use (`3.9:3` = 3-bit rows only, the rest of the budget to corrections). Default:
# 4.6:4 3.9:3 3.9 3.5.
# Needs scripts/reference/build_llama_cpp.sh (llama-quantize, the F32 GGUF) and a release build
# (`cargo build --release`). Prints a markdown table; writes models under $PEERS/frontier.
# Bits per linear weight count every byte of the block linears (blocks, scales, correction
# factors) over their 106,168,320 weights; embeddings are left as each file holds them.
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
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=(4.6:4 3.9:3 3.9 3.5)

[ -x "$BIN/llama-quantize" ] && [ -f "$F32" ] || {
  echo "weights_frontier: run scripts/reference/build_llama_cpp.sh first" >&2; exit 1; }
[ -x "$S2LC" ] || { echo "weights_frontier: run cargo build --release first" >&2; exit 1; }
mkdir -p "$OUT"

# Bytes of the block linears of a model (every tensor of a *_proj, bias aside) in bits per weight.
bits_per_weight() {
  "$S2LC" info --model "$1" | awk '$1 ~ /^model\.layers\..*_proj\./ && $1 !~ /bias$/ { b += $NF }
    END { printf "%.2f", 8 * b / 106168320 }'
}
ppl() { # model text
  "$S2LC" eval --model "$1" --weights native --text "$2" --max-tokens "$TOKENS" --decode-tokens 0 \
    | awk '/^perplexity:/ { print $2 }'
}
decode() { # model
  "$S2LC" eval --model "$1" --weights native --text "${TEXTS[0]}" --max-tokens 512 --decode-tokens 64 \
    | awk '/^decode:/ { print $2 }'
}
row() { # label model [decode note]
  local p=() t
  for t in "${TEXTS[@]}"; do p+=("$(ppl "$2" "$t")"); done
  local dec="${3:-$(decode "$2")}"
  echo "| $1 | $(bits_per_weight "$2") | ${p[0]} | ${p[1]} | $dec |"
}

echo "| model | bits per linear weight | lcet10 ppl | linux ppl | decode tok/s |"
echo "|---|---|---|---|---|"
echo "| dense f32 | 32.00 | $(ppl "$F32" "${TEXTS[0]}") | $(ppl "$F32" "${TEXTS[1]}") | $(decode "$F32") |"
for ty in Q2_K Q3_K_M Q4_0 Q4_K_M Q8_0; do
  m="$OUT/SmolLM2-135M-Instruct.$ty.gguf"
  [ -f "$m" ] || "$BIN/llama-quantize" "$F32" "$m" "$ty" >"$m.log" 2>&1
  # Q2_K / Q3_K have no S2LC kernel: they run re-quantized to Q8_0, so their speed is not theirs.
  case "$ty" in Q2_K|Q3_K_M) row "llama.cpp $ty" "$m" "n/a (runs as Q8_0)" ;; *) row "llama.cpp $ty" "$m" ;; esac
done
for spec in "${BUDGETS[@]}"; do
  b="${spec%%:*}"; bits=2,3,4; [ "$spec" = "$b" ] || bits="${spec#*:}"
  d="$OUT/quant-lr-$b-$bits"
  "$S2LC" compress --model "$F32" --method quant-lr --bits-per-weight "$b" --bits "$bits" \
    --calib-samples 32 -o "$d" >"$d.log" 2>&1
  row "S2LC quant-lr, budget $b, rows of $bits bits" "$d"
done
