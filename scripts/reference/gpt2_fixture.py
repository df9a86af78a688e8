#!/usr/bin/env python3
"""A randomly initialised GPT-2 (Hugging Face layout) and its transformers logits: the reference
for S2LC's GPT-2 path (Conv1D weights, learned positions, LayerNorm with bias, gelu_new).

Run with the reference venv (see scripts/reference/setup-venv and README.md):

    $S2LC_REF_VENV/bin/python scripts/reference/gpt2_fixture.py

No GPT-2 weights are needed: the model is GPT2LMHeadModel with a small config of the GPT-2-small
shape family (CONFIG below), every parameter drawn from a seeded normal distribution (the default
GPT-2 init has zero biases, unit LayerNorm gains and std 0.02 weights, which would leave biases
and norms untested and the logits near zero, so every tensor is redrawn: matrices and embeddings
with std WEIGHT_STD, biases and LayerNorm offsets with std BIAS_STD, LayerNorm gains 1 + BIAS_STD
* N(0, 1)). Eval mode, torch.no_grad, eager attention, float32 throughout.

Writes (regenerate them with this script, never edit them by hand):

crates/s2lc-model/tests/fixtures/gpt2-tiny/
    config.json, model.safetensors: model.save_pretrained(..., safe_serialization=True). No
    tokenizer: none is reachable offline, so the tests feed token ids.

crates/s2lc-model/tests/fixtures/gpt2_tiny_logits.safetensors
    `logits`: [len(IDS), vocab] f32, one forward pass over IDS from an empty context.

crates/s2lc-model/tests/fixtures/gpt2_tiny_reference.json
    ids (IDS), logits_file, logits_max_abs, argmax per position, decode_max_abs_diff (the same ids
    run token by token through transformers' KV cache, max |difference| to the full pass: how far
    transformers itself moves between the two schedules), config, seed, versions, date.
"""

import datetime
import json
import platform
from importlib.metadata import version as pkg_version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from fixture_io import dump_json

SEED = 2026
WEIGHT_STD = 0.15
BIAS_STD = 0.1
CONFIG = dict(
    vocab_size=512,
    n_positions=64,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_inner=None,  # 4 * n_embd, as in every GPT-2 size
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
)
# 16 ids spread over the vocabulary (repeats included, so attention sees equal keys).
IDS = [0, 17, 511, 256, 3, 3, 99, 400, 128, 255, 7, 300, 17, 64, 500, 1]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates/s2lc-model/tests/fixtures"
MODEL_DIR = FIXTURES / "gpt2-tiny"


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    config = GPT2Config(**CONFIG)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + BIAS_STD * noise)
            else:
                p.copy_(WEIGHT_STD * noise)
    model.eval()

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)

    ids = torch.tensor([IDS], dtype=torch.long)
    with torch.no_grad():
        full = model(ids).logits[0].float()
        # Token by token through transformers' own KV cache.
        past = None
        steps = []
        for t in range(len(IDS)):
            out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1].float())
        decode = torch.stack(steps)

    logits_file = "gpt2_tiny_logits.safetensors"
    save_file({"logits": full.contiguous()}, str(FIXTURES / logits_file))
    reference = {
        "ids": IDS,
        "logits_file": logits_file,
        "logits_shape": list(full.shape),
        "logits_max_abs": float(full.abs().max()),
        "argmax": [int(i) for i in full.argmax(dim=-1)],
        "decode_max_abs_diff": float((decode - full).abs().max()),
        "config": {k: v for k, v in CONFIG.items()},
        "seed": SEED,
        "weight_std": WEIGHT_STD,
        "bias_std": BIAS_STD,
        "attn_implementation": "eager",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": pkg_version("transformers"),
            "safetensors": pkg_version("safetensors"),
        },
        "date": datetime.date.today().isoformat(),
    }
    (FIXTURES / "gpt2_tiny_reference.json").write_text(dump_json(reference))
    print(json.dumps({k: reference[k] for k in ("logits_max_abs", "decode_max_abs_diff")}))
    for f in sorted(MODEL_DIR.iterdir()):
        print(f.name, f.stat().st_size)


if __name__ == "__main__":
    main()
