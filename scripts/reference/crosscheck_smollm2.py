#!/usr/bin/env python3
"""Independent PyTorch/transformers reference for S2LC's SmolLM2-135M-Instruct runtime.

Run with the reference venv (see scripts/reference/setup-venv and README.md):

    $S2LC_REF_VENV/bin/python scripts/reference/crosscheck_smollm2.py

Model: $S2LC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf, loaded by transformers
(AutoModelForCausalLM / AutoTokenizer with gguf_file=...), which dequantizes every tensor to f32
(Q4_1 blocks, the Q8_0 token embedding) and reverse-permutes attn_q / attn_k from llama.cpp's
interleaved-RoPE row order back to the Hugging Face half-split (rotate_half) order. Eval mode,
torch.no_grad, torch.set_num_threads(2) (see --threads), float32 throughout.

Writes two fixtures (regenerate them with this script, never edit them by hand):

tests/fixtures/smollm2_prompt_logits.f32
    The 49152 logits at the last position of one forward pass over the ids of PROMPT, as raw
    little-endian f32 (196608 bytes), in vocabulary order.

tests/fixtures/smollm2_reference.json
    prompt, prompt_ids, bos_added
        PROMPT tokenized with tokenizer(PROMPT) and its default add_special_tokens; bos_added
        records whether the tokenizer put a BOS id first (for this GGUF it does not:
        tokenizer.ggml.add_bos_token = false).
    logits_file, logits_min, logits_max, logits_argmax, logits_top5 (+ logits_top5_values)
        Summary of the logits fixture.
    numpy_f64_max_abs_diff
        Max |difference| between the logits fixture and a float64 numpy forward pass written here
        directly from the raw GGUF tensors (llama.cpp interleaved RoPE on the file's q/k rows), an
        independent check of transformers' GGUF loading.
    greedy_ids, greedy_text
        GREEDY_NEW_TOKENS new ids from model.generate(do_sample=False, max_new_tokens=16) after the
        prompt ids, and their decoding (skip_special_tokens=False). The same continuation is
        recomputed with a plain argmax loop without a KV cache (full forward per step) and must match
        (greedy_check_no_cache).
    Perplexity protocol (ppl_*):
        read $S2LC_HOME/text/canterbury/alice29.txt in Python text mode (UTF-8, universal newlines, so
        CRLF -> LF); tokenize the whole text with add_special_tokens=False (no BOS); take the first
        ppl_windows * ppl_window = 4 * 512 = 2048 ids (stored in ppl_ids); split them into
        ppl_windows independent, non-overlapping windows of ppl_window = 512 ids (stride 512), each
        starting with a fresh context (no BOS, no carried KV cache). One forward pass per window;
        the logits (f32) are converted to float64 and log_softmax is taken in float64; the NLL of
        window tokens 1..511 given their prefixes (positions 0..510 predict 1..511) is summed in
        float64 -> 511 predictions per window. ppl_window_nll is the per-window NLL sum (nats),
        ppl_predictions = 4 * 511 = 2044, ppl_mean_nll = sum / ppl_predictions, ppl = exp(mean).
    versions, sha256, threads, date: provenance.
"""

import argparse
import datetime
import math
import os
import platform
import sys
from importlib.metadata import version as pkg_version
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixture_io import dump_json, sha256_file

PROMPT = "The quick brown fox jumps over the lazy dog. In a distant galaxy, scientists discovered"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_FILE = "alice29.txt"
GREEDY_NEW_TOKENS = 16
PPL_WINDOW = 512
PPL_STRIDE = 512
PPL_WINDOWS = 4
VOCAB = 49152

# Checksums of the assets as fetched by scripts/fetch-assets (docs/architecture.md "Assets").
EXPECTED_SHA256 = {
    GGUF_FILE: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    TEXT_FILE: "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
}

REPO = Path(__file__).resolve().parents[2]




def numpy_f64_logits(gguf_path: Path, ids, cfg) -> np.ndarray:
    """Last-position logits from a float64 numpy forward pass written straight from the raw GGUF
    (gguf.quants.dequantize, llama.cpp's interleaved "normal" RoPE on the file's attn_q/attn_k row
    order, tied output = token_embd): a check on transformers' GGUF loading that shares no code
    with it beyond the dequantizer."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    t = {x.name: dequantize(x.data, x.tensor_type).astype(np.float64)
         .reshape([int(d) for d in reversed(x.shape)]) for x in reader.tensors}
    n, nh, nkv = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    eps = float(cfg.rms_norm_eps)
    rp = getattr(cfg, "rope_parameters", None)
    theta = float(rp["rope_theta"] if rp else cfg.rope_theta)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    ang = np.arange(n)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # pairs (2i, 2i+1)
        o = np.empty_like(x)
        o[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        o[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return o

    emb = t["token_embd.weight"]
    x = emb[ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for layer in range(cfg.num_hidden_layers):
        w = lambda k: t[f"blk.{layer}.{k}.weight"]  # noqa: E731
        h = rms(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).reshape(n, nh, hd))
        k = np.repeat(rope((h @ w("attn_k").T).reshape(n, nkv, hd)), nh // nkv, axis=1)
        v = np.repeat((h @ w("attn_v").T).reshape(n, nkv, hd), nh // nkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", s, v).reshape(n, nh * hd) @ w("attn_output").T
        h = rms(x, w("ffn_norm"))
        g = h @ w("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    return rms(x[-1], t["output_norm.weight"]) @ emb.T


def main() -> int:
    s2lc_home = Path(os.environ.get("S2LC_HOME", Path.home() / ".cache" / "s2lc"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=s2lc_home / "models")
    ap.add_argument("--text", type=Path, default=s2lc_home / "text" / "canterbury" / TEXT_FILE)
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    gguf_path = args.models_dir / GGUF_FILE
    for p in (gguf_path, args.text):
        if not p.is_file():
            print(f"crosscheck: missing {p} (run scripts/fetch-assets)", file=sys.stderr)
            return 1
    sha = {GGUF_FILE: sha256_file(gguf_path), TEXT_FILE: sha256_file(args.text)}
    for name, digest in sha.items():
        if digest != EXPECTED_SHA256[name]:
            print(f"crosscheck: warning: {name} sha256 {digest} != expected "
                  f"{EXPECTED_SHA256[name]}", file=sys.stderr)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.models_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        args.models_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    cfg = model.config
    assert cfg.vocab_size == VOCAB, cfg.vocab_size
    assert model.lm_head.weight.dtype == torch.float32
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    with torch.no_grad():
        # ---- prompt logits -------------------------------------------------------------------
        enc = tok(PROMPT)
        prompt_ids = list(enc["input_ids"])
        bos_added = tok.bos_token_id is not None and prompt_ids[0] == tok.bos_token_id
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        logits = model(ids).logits[0, -1].to(torch.float32).contiguous()
        assert logits.shape == (VOCAB,), logits.shape
        logits_np = logits.numpy().astype("<f4")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        logits_path = args.out_dir / "smollm2_prompt_logits.f32"
        logits_path.write_bytes(logits_np.tobytes())
        top5 = torch.topk(logits, 5)

        # ---- greedy continuation -------------------------------------------------------------
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=GREEDY_NEW_TOKENS,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.eos_token_id,
        )
        greedy_ids = gen[0, len(prompt_ids):].tolist()
        greedy_text = tok.decode(greedy_ids, skip_special_tokens=False)
        # Same continuation with a plain argmax loop, no KV cache: a check on generate().
        cur = list(prompt_ids)
        for _ in range(len(greedy_ids)):
            nxt = int(model(torch.tensor([cur])).logits[0, -1].argmax())
            cur.append(nxt)
        greedy_nocache = cur[len(prompt_ids):]
        greedy_check = greedy_nocache == greedy_ids
        if not greedy_check:
            print(f"crosscheck: warning: generate() {greedy_ids} != no-cache argmax loop "
                  f"{greedy_nocache}", file=sys.stderr)

        # ---- perplexity ----------------------------------------------------------------------
        with open(args.text, "r", encoding="utf-8") as f:  # text mode: CRLF -> LF
            text = f.read()
        all_ids = tok(text, add_special_tokens=False)["input_ids"]
        need = PPL_WINDOWS * PPL_WINDOW
        assert len(all_ids) >= need, (len(all_ids), need)
        ppl_ids = list(all_ids[:need])
        window_nll = []
        for w in range(PPL_WINDOWS):
            start = w * PPL_STRIDE
            win = torch.tensor([ppl_ids[start:start + PPL_WINDOW]], dtype=torch.long)
            lg = model(win).logits[0].to(torch.float64)          # [512, V]
            logp = torch.log_softmax(lg, dim=-1)                 # float64
            tgt = win[0, 1:]
            nll = -logp[:-1].gather(1, tgt[:, None]).squeeze(1)  # 511 values
            window_nll.append(float(nll.sum()))
        predictions = PPL_WINDOWS * (PPL_WINDOW - 1)
        mean_nll = math.fsum(window_nll) / predictions
        ppl = math.exp(mean_nll)

    np_logits = numpy_f64_logits(gguf_path, prompt_ids, cfg)
    np_diff = float(np.abs(np_logits - logits_np.astype(np.float64)).max())
    if np_diff > 1e-3 or int(np_logits.argmax()) != int(logits_np.argmax()):
        print(f"crosscheck: warning: numpy f64 forward differs from transformers by {np_diff}",
              file=sys.stderr)

    result = {
        "generated_by": "scripts/reference/crosscheck_smollm2.py",
        "model_file": GGUF_FILE,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "bos_added": bool(bos_added),
        "logits_file": logits_path.name,
        "logits_format": f"{VOCAB} little-endian f32, last prompt position, vocabulary order",
        "logits_min": float(logits_np.min()),
        "logits_max": float(logits_np.max()),
        "logits_argmax": int(logits_np.argmax()),
        "logits_top5": [int(i) for i in top5.indices],
        "logits_top5_values": [float(v) for v in top5.values],
        "logits_top5_tokens": [tok.decode([int(i)]) for i in top5.indices],
        "numpy_f64_max_abs_diff": np_diff,
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "greedy_ids": greedy_ids,
        "greedy_text": greedy_text,
        "greedy_check_no_cache": greedy_check,
        "ppl_text_file": TEXT_FILE,
        "ppl_protocol": (
            "text mode read (CRLF->LF); tokenize whole text, add_special_tokens=False (no BOS); "
            "first ppl_windows*ppl_window ids; independent windows of ppl_window ids, stride "
            "ppl_stride, fresh context each; one forward pass per window; log_softmax in float64 "
            "of f32 logits; NLL of window tokens 1..window-1 summed in float64; "
            "ppl = exp(sum(ppl_window_nll) / ppl_predictions)"),
        "ppl_window": PPL_WINDOW,
        "ppl_stride": PPL_STRIDE,
        "ppl_windows": PPL_WINDOWS,
        "ppl_text_tokens": len(all_ids),
        "ppl_window_nll": window_nll,
        "ppl_predictions": predictions,
        "ppl_mean_nll": mean_nll,
        "ppl": ppl,
        "ppl_ids": ppl_ids,
        "model_notes": {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "lm_head_shares_embedding": bool(tied),
            "rope_theta": float(getattr(cfg, "rope_parameters", {}).get("rope_theta")
                                if getattr(cfg, "rope_parameters", None)
                                else getattr(cfg, "rope_theta", float("nan"))),
            "rms_norm_eps": float(cfg.rms_norm_eps),
            "attn_implementation": str(cfg._attn_implementation),
            "qk_rows": "attn_q/attn_k un-permuted from GGUF (llama.cpp interleaved) to HF rotate_half order",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": pkg_version("accelerate"),
            "gguf": pkg_version("gguf"),
            "tokenizers": pkg_version("tokenizers"),
            "numpy": np.__version__,
        },
        "sha256": sha,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    json_path = args.out_dir / "smollm2_reference.json"
    json_path.write_text(dump_json(result))

    print(f"prompt ids ({len(prompt_ids)}, bos_added={bos_added}): {prompt_ids}")
    print(f"logits: min {result['logits_min']:.4f} max {result['logits_max']:.4f} "
          f"argmax {result['logits_argmax']} top5 {result['logits_top5']} "
          f"{result['logits_top5_tokens']}")
    print(f"numpy f64 forward from the raw GGUF vs transformers logits: max abs diff {np_diff:.3g}")
    print(f"greedy ({len(greedy_ids)}): {greedy_ids} {greedy_text!r} (no-cache check: {greedy_check})")
    print(f"ppl {TEXT_FILE}: window NLL sums {[round(x, 4) for x in window_nll]}, "
          f"{predictions} predictions, mean NLL {mean_nll:.6f}, ppl {ppl:.4f}")
    print(f"wrote {logits_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
