#!/usr/bin/env python3
"""PyTorch batch-1 speed of SmolLM2-135M-Instruct (the reference S2LC's runtime is compared with).

    $S2LC_REF_VENV/bin/python scripts/reference/bench_torch.py [--prompt-tokens 128]
        [--new-tokens 128] [--threads 2] [--repeats 3]

The GGUF ($S2LC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf) is loaded by transformers and dequantized
to f32 weights; eval mode, torch.no_grad, torch.set_num_threads(--threads). The prompt is the first
--prompt-tokens ids of alice29.txt (text mode, CRLF -> LF, add_special_tokens=False).

prefill: one forward pass over the prompt with use_cache=True (fresh cache each time);
         tok/s = prompt tokens / seconds.
decode:  after a prefill (not timed), --new-tokens greedy steps of one token each with the KV cache
         (past_key_values, argmax of the last logits); only the decode loop is timed;
         tok/s = new tokens / seconds.
One untimed warm-up of each, then --repeats timed runs; the median is reported (min and max too), and
the lowest ratio of process CPU time to wall time over the timed runs (close to --threads when PyTorch's
threads had the cores to themselves; clearly lower means the run was disturbed).
Run it on an otherwise idle machine: with more runnable threads than cores, PyTorch's OpenMP threads
wait on each other and decode gets several times slower (a warning is printed when the load average
is high).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def prefill(model, ids):
    c0, t0 = cpu_seconds(), time.perf_counter()
    model(ids, use_cache=True)
    dt = time.perf_counter() - t0
    return dt, (cpu_seconds() - c0) / dt


def decode(model, ids, new_tokens):
    out = model(ids, use_cache=True)  # prefill, not timed
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    produced = [int(nxt)]
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        produced.append(int(nxt))
    dt = time.perf_counter() - t0
    return dt, (cpu_seconds() - c0) / dt


def busy_fraction(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` (Linux /proc/stat), or None elsewhere."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def main() -> int:
    s2lc_home = Path(os.environ.get("S2LC_HOME", Path.home() / ".cache" / "s2lc"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation (default: sdpa)")
    ap.add_argument("--models-dir", type=Path, default=s2lc_home / "models")
    ap.add_argument("--text", type=Path,
                    default=s2lc_home / "text" / "canterbury" / "alice29.txt")
    args = ap.parse_args()
    if not (args.models_dir / GGUF_FILE).is_file() or not args.text.is_file():
        print("bench_torch: assets missing (run scripts/fetch-assets)", file=sys.stderr)
        return 1

    busy = busy_fraction()
    if busy is not None and busy > 0.15:
        print(f"bench_torch: warning: the CPUs were {busy:.0%} busy before the run; other work "
              f"distorts the figures (PyTorch's OpenMP threads slow down badly when cores are "
              f"oversubscribed)", file=sys.stderr)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.models_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        args.models_dir, gguf_file=GGUF_FILE, dtype=torch.float32,
        attn_implementation=args.attn)
    model.eval()
    with open(args.text, "r", encoding="utf-8") as f:
        ids_all = tok(f.read(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids_all[:args.prompt_tokens]], dtype=torch.long)
    n_params = sum(p.numel() for p in model.parameters())

    with torch.no_grad():
        prefill(model, ids)                      # warm-up
        decode(model, ids, min(8, args.new_tokens))
        pre = [prefill(model, ids) for _ in range(args.repeats)]
        dec = [decode(model, ids, args.new_tokens) for _ in range(args.repeats)]

    def rates(n, runs):
        r = sorted(n / t for t, _ in runs)
        return statistics.median(r), r[0], r[-1], min(u for _, u in runs)

    pm, plo, phi, pcpu = rates(ids.shape[1], pre)
    dm, dlo, dhi, dcpu = rates(args.new_tokens, dec)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, attn {model.config._attn_implementation}, "
          f"CPUs busy before the run {'?' if busy is None else f'{busy:.0%}'}, "
          f"f32 weights {n_params * 4 / 1e6:.0f} MB ({n_params / 1e6:.1f} M params, tied)")
    print(f"torch prefill: {pm:.1f} tok/s ({ids.shape[1]} tokens; median of {args.repeats}, "
          f"min {plo:.1f}, max {phi:.1f}; cpu/wall >= {pcpu:.2f})")
    print(f"torch decode: {dm:.1f} tok/s ({args.new_tokens} new tokens after a "
          f"{ids.shape[1]}-token prompt, KV cache; median of {args.repeats}, "
          f"min {dlo:.1f}, max {dhi:.1f}; cpu/wall >= {dcpu:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
