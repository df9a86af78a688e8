#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2 (the Context Router's encoder), computed with
PyTorch + transformers exactly as sentence-transformers does for this model: tokens truncated to
256, BertModel, mean pooling over the attention mask, L2 normalization.

    "$VENV/bin/python" scripts/reference/minilm_embeddings.py

Writes tests/fixtures/minilm_embeddings.json (texts, token counts, embeddings rounded to 7
decimals), which crates/s2lc-model/tests/encoder_real.rs compares S2LC's encoder against.
"""
import json
import os
import pathlib

import torch
from transformers import AutoModel, AutoTokenizer

home = pathlib.Path(os.environ.get("S2LC_HOME", pathlib.Path.home() / ".cache/s2lc"))
model_dir = home / "models/all-MiniLM-L6-v2"
root = pathlib.Path(__file__).resolve().parents[2]
alice = (home / "text/canterbury/alice29.txt").read_text(encoding="latin-1")

texts = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "The kernel schedules threads on CPUs; each runqueue holds the runnable tasks.",
    # Longer than 256 tokens: checks the truncation.
    " ".join(alice.split()[2000:2400]),
]

torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
out = []
with torch.no_grad():
    for t in texts:
        enc = tok(t, truncation=True, max_length=256, return_tensors="pt")
        h = model(**enc).last_hidden_state[0]
        mask = enc["attention_mask"][0].unsqueeze(-1).float()
        e = (h * mask).sum(0) / mask.sum()
        e = torch.nn.functional.normalize(e, dim=0)
        out.append({"text": t, "tokens": int(enc["input_ids"].shape[1]),
                    "embedding": [round(float(v), 7) for v in e]})
path = root / "tests/fixtures/minilm_embeddings.json"
path.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "torch": torch.__version__,
                            "items": out}, indent=0))
print(f"wrote {path}: {[o['tokens'] for o in out]} tokens")
