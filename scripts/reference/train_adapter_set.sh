#!/usr/bin/env bash
# Train S2LC's real adapter set with PEFT (scripts/reference/train_adapters.py), one after another:
#   one rank-8 adapter per text domain (q/k/v/o/gate/up/down) and a rank sweep 4/16/32 on Shakespeare;
#   with --experts, one full-FFN domain expert per text domain instead (expert set ffn-every3).
#
#   S2LC_REF_VENV=... scripts/reference/train_adapter_set.sh [--experts] [--steps N] [--only NAME...]
#
# Every adapter uses the same recipe (seq 256, batch 4, lr 2e-3, seed 0, last 10 % held out) and is
# written to $S2LC_HOME/adapters/NAME; experts use lr 1e-4 on the FFN of layers 0,3,...,27 and go to
# $S2LC_HOME/experts/ffn-every3. One that is already there is skipped. ~9 minutes per adapter on
# this 2-core machine when idle (80 steps); never run by CI.
# Texts come from scripts/fetch-assets (Canterbury files and text/domains/{python,linux}.txt).
set -euo pipefail

S2LC_HOME="${S2LC_HOME:-$HOME/.cache/s2lc}"
VENV="${S2LC_REF_VENV:-$S2LC_HOME/ref-venv}"
HERE="$(cd "$(dirname "$0")" && pwd)"
STEPS=80
EXPERTS=0
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --experts) EXPERTS=1; shift ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "train_adapter_set: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

T="$S2LC_HOME/text"
# domain text (the same list as s2lc_model::assets::DOMAINS)
DOMAINS=(
  "shakespeare $T/canterbury/asyoulik.txt"
  "milton $T/canterbury/plrabn12.txt"
  "carroll $T/canterbury/alice29.txt"
  "techreport $T/canterbury/lcet10.txt"
  "python $T/domains/python.txt"
  "linux $T/domains/linux.txt"
)
# name rank text
if [ "$EXPERTS" = 1 ]; then
  SET=()
  for d in "${DOMAINS[@]}"; do read -r name text <<<"$d"; SET+=("$name - $text"); done
else
  SET=()
  for d in "${DOMAINS[@]}"; do read -r name text <<<"$d"; SET+=("$name-r8 8 $text"); done
  for r in 4 16 32; do SET+=("shakespeare-r$r $r $T/canterbury/asyoulik.txt"); done
fi

failed=0
for entry in "${SET[@]}"; do
  read -r name rank text <<<"$entry"
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " == *" $name "* ]]; then continue; fi
  [ -f "$text" ] || { echo "train_adapter_set: $text missing (run scripts/fetch-assets)" >&2; exit 1; }
  if [ "$EXPERTS" = 1 ]; then
    manifest="$S2LC_HOME/experts/ffn-every3/manifest.json"
    if [ -f "$manifest" ] && grep -q "\"$name\": {" "$manifest"; then
      echo "train_adapter_set: expert $name present" >&2; continue
    fi
    echo "train_adapter_set: expert $name ($STEPS steps) on $(basename "$text")" >&2
    "$VENV/bin/python" "$HERE/train_adapters.py" --mode experts --text "$text" --name "$name" \
      --steps "$STEPS" || { echo "train_adapter_set: expert $name FAILED" >&2; failed=1; }
    continue
  fi
  out="$S2LC_HOME/adapters/$name"
  if [ -f "$out/s2lc_training.json" ]; then echo "train_adapter_set: $name present" >&2; continue; fi
  echo "train_adapter_set: $name (rank $rank, $STEPS steps) on $(basename "$text")" >&2
  "$VENV/bin/python" "$HERE/train_adapters.py" --text "$text" --name "$name" --rank "$rank" \
    --alpha $((2 * rank)) --steps "$STEPS" --lr 2e-3 || { echo "train_adapter_set: $name FAILED" >&2; failed=1; }
done
exit "$failed"
