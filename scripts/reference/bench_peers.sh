#!/usr/bin/env bash
# Batch-1 CPU speed of the peer engines on SmolLM2-135M-Instruct, as one markdown table.
#
#   scripts/reference/bench_peers.sh [--quick]
#
# llama.cpp (built by scripts/reference/build_llama_cpp.sh under ${S2LC_PEERS:-$HOME/.cache/s2lc-peers}):
# `llama-bench -p 512 -n 128 -t 2` on the Q4_1 GGUF from $S2LC_HOME/models and on its F16 and F32
# requantizations. PyTorch: scripts/reference/bench_torch.py (f32) with the python of
# ${S2LC_REF_VENV:-$S2LC_HOME/ref-venv}, skipped with a note when that venv is missing.
# --quick: one repetition each (llama-bench -r 1, bench_torch --repeats 1) instead of 5 and 3.
# Run it on an otherwise idle machine; the load average before the run is printed with the table.
set -euo pipefail

S2LC_HOME="${S2LC_HOME:-$HOME/.cache/s2lc}"
PEERS="${S2LC_PEERS:-$HOME/.cache/s2lc-peers}"
REF_VENV="${S2LC_REF_VENV:-$S2LC_HOME/ref-venv}"
BENCH="$PEERS/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench"
HERE="$(cd "$(dirname "$0")" && pwd)"
REPS=5 TORCH_REPS=3 THREADS=2

for arg in "$@"; do
  case "$arg" in
    --quick) REPS=1 TORCH_REPS=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "bench_peers: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

say() { echo "bench_peers: $*" >&2; }
FILES=(
  "Q4_1 (Q8_0 embedding)|$S2LC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  "F16|$PEERS/models/SmolLM2-135M-Instruct.F16.gguf"
  "F32|$PEERS/models/SmolLM2-135M-Instruct.F32.gguf"
)
if [ ! -x "$BENCH" ]; then
  say "llama.cpp is not built ($BENCH missing): run scripts/reference/build_llama_cpp.sh first"
  exit 1
fi
for f in "${FILES[@]}"; do
  if [ ! -f "${f#*|}" ]; then
    say "${f#*|} missing: run scripts/fetch-assets and scripts/reference/build_llama_cpp.sh first"
    exit 1
  fi
done

load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
rows=()
for f in "${FILES[@]}"; do
  weights="${f%%|*}" file="${f#*|}"
  say "llama-bench on $(basename "$file")"
  # jsonl: one JSON object per test (pp512, then tg128); avg_ts = mean tokens/s over the repetitions.
  out="$("$BENCH" -m "$file" -p 512 -n 128 -t "$THREADS" -r "$REPS" -o jsonl 2>/dev/null)" \
    || { say "llama-bench failed on $file"; exit 1; }
  rows+=("$(python3 -c '
import json, sys
tests = [json.loads(l) for l in sys.argv[2].splitlines() if l.startswith("{")]
pp = next(t for t in tests if t["n_prompt"] > 0)
tg = next(t for t in tests if t["n_gen"] > 0)
# The best repetition first (the statistic `s2lc bench decode` reports), then mean ± sd.
fmt = lambda t: "%.1f (%.1f ± %.1f)" % (max(t["samples_ts"]), t["avg_ts"], t["stddev_ts"])
print("| llama.cpp %s | %s | %s | %s |" % (pp["build_commit"], sys.argv[1], fmt(pp), fmt(tg)))
' "$weights" "$out")")
done

if [ -x "$REF_VENV/bin/python" ]; then
  say "bench_torch.py (f32)"
  # bench_torch prints "torch prefill: X tok/s (...)" and "torch decode: Y tok/s (...)".
  out="$("$REF_VENV/bin/python" "$HERE/bench_torch.py" --prompt-tokens 512 --new-tokens 128 \
    --threads "$THREADS" --repeats "$TORCH_REPS")" || { say "bench_torch.py failed"; exit 1; }
  ver="$(sed -n 's/^torch \([0-9][^,]*\), transformers.*/\1/p' <<<"$out")"
  pre="$(sed -n 's/^torch prefill: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")"
  dec="$(sed -n 's/^torch decode: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")"
  rows+=("| PyTorch $ver (transformers) | F32 (dequantized Q4_1) | $pre | $dec |")
else
  say "no venv at $REF_VENV (scripts/reference/setup-venv): PyTorch skipped"
  rows+=("| PyTorch | F32 | skipped (no venv) | skipped |")
fi

echo
echo "SmolLM2-135M-Instruct, batch 1, $THREADS threads, $(nproc) CPUs, load average before: $load"
echo
echo "| engine | weights | prefill 512 tok/s | decode tok/s |"
echo "| --- | --- | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
echo "llama.cpp: best (mean ± sd) of $REPS run(s) of llama-bench (decode = tg128 from an empty context)."
echo "PyTorch: median of $TORCH_REPS run(s); decode = 128 steps after the 512-token prompt."
