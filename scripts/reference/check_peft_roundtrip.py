#!/usr/bin/env python3
"""Check that an adapter written by S2LC loads in PEFT and gives S2LC's logits (PEFT round trip).

    cargo build --release -p s2lc
    $S2LC_REF_VENV/bin/python scripts/reference/check_peft_roundtrip.py \\
        [--adapter tests/fixtures/adapters/alice-r4] [--energy 0.9] \\
        [--fixture tests/fixtures/adapters/alice-r4-e90]

Steps:
1. `s2lc adapters truncate ADAPTER --energy E -o FIXTURE` re-ranks every delta of a real PEFT adapter
   by its spectrum and writes it in PEFT layout: per-module ranks in `rank_pattern` /
   `alpha_pattern`, scales folded into B (lora_alpha = rank).
2. `s2lc logits --weights f32 --adapter FIXTURE --prompt PROMPT` writes S2LC's last-position logits.
3. transformers loads the GGUF (dequantized to f32, exactly as train_adapters.py does) and
   `peft.PeftModel.from_pretrained(FIXTURE)` applies the S2LC-written adapter; its LoRA layers must
   have the ranks S2LC wrote, and no adapter tensor may be missing or unexpected.
4. PEFT's logits (unmerged, eval, no grad, f32) must equal S2LC's within 1e-3 of their range.

The S2LC-written adapter plus PEFT's logits (reference_logits.f32) and reference.json stay in
FIXTURE: the Rust test crates/s2lc-model/tests/lora_real.rs checks S2LC against them without Python.
Exits 1 when a check fails (the fixture's reference files are then not written).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft import PeftModel
from safetensors import safe_open

from fixture_io import dump_json, sha256_file
from train_adapters import GGUF_FILE, PROMPT, REPO, last_logits, versions


def run(cmd):
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(out.stdout, end="")
    return out.stdout


def main() -> int:
    s2lc_home = Path(os.environ.get("S2LC_HOME", Path.home() / ".cache" / "s2lc"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--s2lc", type=Path, default=REPO / "target" / "release" / "s2lc")
    ap.add_argument("--adapter", type=Path, default=REPO / "tests/fixtures/adapters/alice-r4")
    ap.add_argument("--energy", type=float, default=0.9)
    ap.add_argument("--fixture", type=Path, default=REPO / "tests/fixtures/adapters/alice-r4-e90")
    ap.add_argument("--models-dir", type=Path, default=s2lc_home / "models")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    gguf = args.models_dir / GGUF_FILE
    for p in (args.s2lc, gguf, args.adapter):
        if not p.exists():
            print(f"check_peft_roundtrip: missing {p}", file=sys.stderr)
            return 1

    truncate_out = run([args.s2lc, "adapters", "truncate", args.adapter,
                        "--energy", str(args.energy), "-o", args.fixture])
    with tempfile.TemporaryDirectory() as tmp:
        logits_path = Path(tmp) / "s2lc_logits.f32"
        run([args.s2lc, "logits", "--model", gguf, "--weights", "f32", "--adapter", args.fixture,
             "--prompt", PROMPT, "-o", logits_path])
        s2lc_logits = np.fromfile(logits_path, dtype="<f4")

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.models_dir, gguf_file=GGUF_FILE)
    base = AutoModelForCausalLM.from_pretrained(args.models_dir, gguf_file=GGUF_FILE,
                                                dtype=torch.float32)
    base.eval()
    prompt_ids = list(tok(PROMPT, add_special_tokens=False)["input_ids"])
    model = PeftModel.from_pretrained(base, args.fixture)
    model.eval()

    config = json.loads((args.fixture / "adapter_config.json").read_text())
    failures = []
    written = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            written[key] = module.lora_A["default"].weight.shape[0]
    want = {}
    with safe_open(args.fixture / "adapter_model.safetensors", "pt") as f:
        for t in f.keys():
            if t.endswith("lora_A.weight"):
                key = t.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                want[key] = f.get_slice(t).get_shape()[0]
    if written != want:
        failures.append(f"PEFT's LoRA ranks differ from the file's: {len(written)} modules in "
                        f"PEFT, {len(want)} in the file")
    ranks = sorted(set(want.values()))

    peft_logits = last_logits(model, prompt_ids)
    rng = float(peft_logits.max() - peft_logits.min())
    diff = float(np.abs(peft_logits - s2lc_logits).max())
    print(f"modules {len(want)}, ranks {ranks}; max |PEFT - S2LC| logit {diff:.3e} "
          f"(range {rng:.2f}, tolerance {1e-3 * rng:.3e})")
    if diff > 1e-3 * rng:
        failures.append(f"logits differ by {diff} (> 1e-3 of range {rng})")
    if int(peft_logits.argmax()) != int(s2lc_logits.argmax()):
        failures.append("argmax differs")
    if failures:
        for f in failures:
            print("check_peft_roundtrip: FAILED: " + f, file=sys.stderr)
        return 1

    peft_logits.tofile(args.fixture / "reference_logits.f32")
    (args.fixture / "reference.json").write_text(dump_json({
        "generated_by": "scripts/reference/check_peft_roundtrip.py",
        "source_adapter": str(args.adapter.relative_to(REPO)) if args.adapter.is_relative_to(REPO)
        else str(args.adapter),
        "s2lc_command": f"s2lc adapters truncate SOURCE --energy {args.energy} -o FIXTURE",
        "s2lc_truncate_output": truncate_out.strip().splitlines(),
        "energy": args.energy,
        "rank": config["r"],
        "module_ranks": ranks,
        "modules": len(want),
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "bos_added": False,
        "logits_file": "reference_logits.f32",
        "logits_format": "49152 little-endian f32, last prompt position, vocabulary order; "
                         "PeftModel (unmerged) loaded from the S2LC-written files, eval, no grad",
        "logits_min": float(peft_logits.min()),
        "logits_max": float(peft_logits.max()),
        "logits_argmax": int(peft_logits.argmax()),
        "s2lc_vs_peft_max_abs_diff": diff,
        "versions": versions(),
        "sha256": {GGUF_FILE: sha256_file(gguf),
                   "adapter_model.safetensors": sha256_file(
                       args.fixture / "adapter_model.safetensors")},
    }))
    print(f"fixture written to {args.fixture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
