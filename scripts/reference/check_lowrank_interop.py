#!/usr/bin/env python3
"""Interop check for `s2lc compress` output, with no S2LC code involved.

Loads a compressed model directory with the `safetensors` package (numpy), reads the compression
record from the safetensors metadata, and for a few plain-SVD-compressed matrices checks, against the
original GGUF weights dequantized by the `gguf` package:

  * the factors have the recorded rank and shapes (`lowrank_u`: out x r, `lowrank_vs`: r x in);
  * ||W - U @ Vs||_F / ||W||_F equals sqrt(sum_{i>r} s_i^2 / sum s_i^2) from numpy's SVD of W.

Usage (after `s2lc compress --method svd --energy 0.9 -o OUT`):
    python scripts/reference/check_lowrank_interop.py OUT [--gguf PATH] [--matrices N]
"""
import argparse
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open


def unpermute(w, n_heads):
    """Undo llama.cpp's q/k row permutation (GGUF [h][i][t] -> HF [h][t][i])."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def main():
    home = os.environ.get("S2LC_HOME", os.path.expanduser("~/.cache/s2lc"))
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="directory written by s2lc compress")
    ap.add_argument("--gguf", default=os.path.join(home, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--matrices", type=int, default=6)
    args = ap.parse_args()

    path = os.path.join(args.out, "model.safetensors")
    with safe_open(path, framework="numpy") as f:
        record = json.loads(f.metadata()["s2lc"])
        if record["method"] != "svd":
            sys.exit("this check needs a plain-SVD compression (--method svd)")
        low = [m for m in record["matrices"] if m["rank"] is not None]
        step = max(1, len(low) // args.matrices)
        chosen = low[::step][: args.matrices]
        factors = {m["name"]: (f.get_tensor(m["name"] + ".lowrank_u"), f.get_tensor(m["name"] + ".lowrank_vs")) for m in chosen}

    reader = GGUFReader(args.gguf)
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].parts[-1][0])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    tensors = {t.name: t for t in reader.tensors}
    worst = 0.0
    for m in chosen:
        layer = m["name"].split(".")[2]
        leaf = ".".join(m["name"].split(".")[3:])
        t = tensors[f"blk.{layer}.{names[leaf]}.weight"]
        w = dequantize(t.data, t.tensor_type).reshape(m["rows"], m["cols"]).astype(np.float64)
        if leaf == "self_attn.q_proj":
            w = unpermute(w, heads)
        elif leaf == "self_attn.k_proj":
            w = unpermute(w, kv_heads)
        u, vs = factors[m["name"]]
        r = m["rank"]
        assert u.shape == (m["rows"], r) and vs.shape == (r, m["cols"]), (u.shape, vs.shape)
        s = np.linalg.svd(w, compute_uv=False)
        want = np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())
        got = np.linalg.norm(w - u.astype(np.float64) @ vs.astype(np.float64)) / np.linalg.norm(w)
        worst = max(worst, abs(got - want))
        print(f"{m['name']:40s} {m['rows']}x{m['cols']} rank {r:4d}: ||W-U.Vs||/||W|| = {got:.6f}, "
              f"sqrt(discarded energy) = {want:.6f}")
    print(f"worst |difference| = {worst:.2e}")
    if worst > 1e-3:
        sys.exit("mismatch: the factors do not reproduce W up to the discarded energy")


if __name__ == "__main__":
    main()
