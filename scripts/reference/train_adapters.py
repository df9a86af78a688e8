#!/usr/bin/env python3
"""Train a LoRA adapter for SmolLM2-135M-Instruct with Hugging Face PEFT on one text domain (CPU).

Run with the reference venv (see scripts/reference/setup-venv and README.md; it pins peft==0.21.2):

    $S2LC_REF_VENV/bin/python scripts/reference/train_adapters.py \\
        --text $S2LC_HOME/text/canterbury/asyoulik.txt --name shakespeare-r8 [--steps 300 ...]

    # the committed test fixture tests/fixtures/adapters/alice-r4 (~6 minutes here):
    $S2LC_REF_VENV/bin/python scripts/reference/train_adapters.py \\
        --text $S2LC_HOME/text/canterbury/alice29.txt --name alice-r4 --rank 4 --alpha 8 \\
        --targets q_proj,v_proj --steps 60 --lr 2e-3 --fixture tests/fixtures/adapters/alice-r4

    # a domain expert (--mode experts): the full FFN of every third layer fine-tuned on one domain,
    # added to the expert set $S2LC_HOME/experts/ffn-every3 (see train_experts below):
    $S2LC_REF_VENV/bin/python scripts/reference/train_adapters.py --mode experts \\
        --text $S2LC_HOME/text/canterbury/asyoulik.txt --name shakespeare [--steps 80 ...]

Never run by CI and never needed by the library: it produces adapters to try S2LC's adapter support
on, and (with --fixture) a small committed fixture that the Rust runtime is tested against. Runtime
on this 2-core CPU (torch.set_num_threads(2), idle machine): ~5.3 s per step at --batch 4 --seq 256
with rank 4 on q_proj,v_proj, ~5.7 s per step with rank 8 on all seven projections, plus ~45 s for
loading, the two held-out evaluations and saving. The alice-r4 fixture (60 steps) took 6m10s; 80
steps of the default rank-8 adapter on asyoulik.txt took 10m20s (7.1 s/step: a cargo build ran
alongside); the default 300 steps take ~30 minutes. Several times slower when the cores are busy.

Model: $S2LC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf loaded by transformers exactly as in
crosscheck_smollm2.py (AutoModelForCausalLM / AutoTokenizer with gguf_file=..., every tensor
dequantized to f32, q/k rows un-permuted to the HF rotate_half order), float32 throughout.

Data: the --text file is read in text mode (UTF-8, universal newlines, so CRLF -> LF) and tokenized
whole with add_special_tokens=False (no BOS; this GGUF's tokenizer never adds one). The LAST --heldout
fraction of the token stream is held out: heldout_start = floor(n_tokens * (1 - heldout)). Training
windows of --seq ids are drawn only from ids[0:heldout_start] (uniform random starts from a
torch.Generator seeded with --seed; a window never crosses heldout_start).

Training: peft.get_peft_model with LoraConfig(r=--rank, lora_alpha=--alpha, target_modules=--targets,
lora_dropout=0, bias="none", task_type=CAUSAL_LM) after torch.manual_seed(--seed) (LoRA A gets
PEFT's default Kaiming-uniform init, B = 0). AdamW (weight decay 0) on the LoRA parameters only,
--lr with a linear warm-up over the first 10 % of the steps then cosine decay to 0, gradient norm
clipped to 1.0; each step is one forward/backward pass over --batch windows, loss = the model's mean
next-token cross entropy (labels = input ids). The adapter is written with model.save_pretrained(DIR)
(adapter_config.json + adapter_model.safetensors in PEFT's own layout, tensor names like
base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, no ".default"), then reloaded with
PeftModel.from_pretrained onto an untouched copy of the base model for everything measured below.

Held-out perplexity (base model and reloaded adapter, eval mode, no grad): independent windows of --seq
ids starting at heldout_start and stepping by --seq, only full windows, a fresh context each; the NLL
of window tokens 1..seq-1 from float64 log_softmax of the f32 logits, summed in float64;
ppl = exp(sum / scored). Written with all arguments, the loss curve, wall times and versions to
DIR/s2lc_training.json. The adapter must beat the base on its own held-out text: otherwise the script
says so on stderr and exits 1 (the adapter and s2lc_training.json are still written, the fixture is not).

--fixture FDIR additionally writes a fixture for the Rust runtime into FDIR (regenerate, never
hand-edit): copies of adapter_config.json and adapter_model.safetensors, reference_logits.f32 (the
49152 last-position logits of PROMPT with the adapter applied: PeftModel, unmerged, eval, no grad, f32,
raw little-endian f32 in vocabulary order) and reference.json (prompt, prompt_ids, logits summary, the
base model's argmax and the max |adapter - base| logit difference at that position, the held-out
perplexities, versions).
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from fixture_io import dump_json, sha256_file

PROMPT = "The quick brown fox jumps over the lazy dog. In a distant galaxy, scientists discovered"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
FIXTURE_MAX_BYTES = 4 * 1024 * 1024
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

REPO = Path(__file__).resolve().parents[2]




def heldout_ppl(model, ids, start, seq):
    """Perplexity over independent full windows of `seq` ids from `start`, stride `seq`."""
    windows = (len(ids) - start) // seq
    nll_sums = []
    with torch.no_grad():
        for w in range(windows):
            s = start + w * seq
            win = torch.tensor([ids[s:s + seq]], dtype=torch.long)
            lg = model(input_ids=win, use_cache=False).logits[0].to(torch.float64)
            logp = torch.log_softmax(lg, dim=-1)
            nll = -logp[:-1].gather(1, win[0, 1:, None]).squeeze(1)
            nll_sums.append(float(nll.sum()))
    scored = windows * (seq - 1)
    mean_nll = math.fsum(nll_sums) / scored
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll, "windows": windows,
            "scored": scored, "window_nll": nll_sums}


def last_logits(model, prompt_ids):
    with torch.no_grad():
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = model(input_ids=ids, use_cache=False).logits[0, -1].to(torch.float32).contiguous()
    assert out.shape == (VOCAB,), out.shape
    return out.numpy().astype("<f4")


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": pkg_version("accelerate"),
        "gguf": pkg_version("gguf"),
        "tokenizers": pkg_version("tokenizers"),
        "safetensors": pkg_version("safetensors"),
        "numpy": np.__version__,
    }


def train_loop(model, params, ids, heldout_start, args):
    """AdamW on `params` over random --seq windows of ids[:heldout_start]; returns the losses,
    the training seconds and the warm-up steps. The model is left in eval mode."""
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def lr_factor(step):  # step = number of scheduler.step() calls so far
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, args.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    train_ids = torch.tensor(ids[:heldout_start], dtype=torch.long)
    max_start = heldout_start - args.seq  # window [s, s+seq) stays below heldout_start
    losses = []
    model.train()
    t_train = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t_train
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} [{el:.0f} s, {el / (step + 1):.2f} s/step]",
                  flush=True)
    model.eval()
    return losses, time.perf_counter() - t_train, warmup


FFN_MODULES = ("gate_proj", "up_proj", "down_proj")


def ffn_tensors(model, layers):
    """The FFN weights of `layers` under their Hugging Face names, f32, contiguous, on the CPU."""
    out = {}
    for layer in layers:
        mlp = model.model.layers[layer].mlp
        for m in FFN_MODULES:
            out[f"model.layers.{layer}.mlp.{m}.weight"] = (
                getattr(mlp, m).weight.detach().to(torch.float32).contiguous().clone())
    return out


def train_experts(args, base, ids, heldout_start, base_eval, gguf_path, t_start):
    """Branch-Train-MiX style domain expert: the full FFN (gate/up/down) of --expert-layers is
    fine-tuned on the domain text, everything else frozen, and saved into the expert set
    $S2LC_HOME/experts/SET: base_ffn.safetensors (the shared base FFN of those layers, written
    once), NAME.safetensors (this domain's FFN, same tensor names) and manifest.json."""
    from safetensors.torch import load_file, save_file
    n_layers = base.config.num_hidden_layers
    layers = (list(range(0, n_layers, 3)) if args.expert_layers is None
              else [int(x) for x in args.expert_layers.split(",") if x.strip()])
    if not layers or any(not 0 <= l < n_layers for l in layers):
        print(f"train_adapters: --expert-layers must name layers in 0..{n_layers - 1}",
              file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    base_ffn = ffn_tensors(base, layers)
    base_file = out / "base_ffn.safetensors"
    if manifest is None:
        save_file(base_ffn, str(base_file), metadata={"format": "pt"})
        manifest = {
            "kind": "s2lc-expert-set",
            "note": ("domain FFN experts built by S2LC from the dense SmolLM2 model "
                     "(Branch-Train-MiX style fine-tuning), not taken from a released MoE"),
            "base_model": GGUF_FILE,
            "base_model_sha256": sha256_file(gguf_path),
            "layers": layers,
            "modules": list(FFN_MODULES),
            "base_file": base_file.name,
            "experts": {},
        }
    else:
        if manifest["layers"] != layers or manifest["base_model_sha256"] != sha256_file(gguf_path):
            print(f"train_adapters: {manifest_path} has layers {manifest['layers']} for another "
                  f"setting; use another --expert-set", file=sys.stderr)
            return 1
        stored = load_file(str(base_file))
        if any(not torch.equal(stored[k], v) for k, v in base_ffn.items()):
            print(f"train_adapters: {base_file} differs from this base model", file=sys.stderr)
            return 1

    for p in base.parameters():
        p.requires_grad_(False)
    params = []
    for layer in layers:
        for m in FFN_MODULES:
            w = getattr(base.model.layers[layer].mlp, m).weight
            w.requires_grad_(True)
            params.append(w)
    n_trainable = sum(p.numel() for p in params)
    print(f"expert {args.name}: {n_trainable} trainable FFN parameters in layers {layers}",
          flush=True)
    losses, train_seconds, warmup = train_loop(base, params, ids, heldout_start, args)
    expert_eval = heldout_ppl(base, ids, heldout_start, args.seq)
    expert = ffn_tensors(base, layers)
    residual = math.sqrt(sum(float(((expert[k] - v) ** 2).sum()) for k, v in base_ffn.items()))
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in base_ffn.values()))
    file = out / f"{args.name}.safetensors"
    save_file(expert, str(file), metadata={"format": "pt"})
    beats = expert_eval["ppl"] < base_eval["ppl"]
    manifest["experts"][args.name] = {
        "file": file.name,
        "text": args.text.name,
        "text_sha256": sha256_file(args.text),
        "heldout_start_token": heldout_start,
        "heldout_tokens_scored": base_eval["scored"],
        "base_heldout_ppl": base_eval["ppl"],
        "expert_heldout_ppl": expert_eval["ppl"],
        "expert_beats_base": beats,
        "residual_rel_frobenius": residual / norm,
        "trainable_parameters": n_trainable,
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "seed": args.seed,
        "schedule": f"AdamW(wd=0), linear warm-up {warmup} steps then cosine to 0, grad-norm clip 1.0",
        "final_train_loss_mean_last10": sum(losses[-10:]) / len(losses[-10:]),
        "train_losses": losses,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    tmp = manifest_path.with_suffix(".json.part")
    tmp.write_text(dump_json(manifest))
    tmp.replace(manifest_path)
    print(f"expert {args.name}: held-out ppl {expert_eval['ppl']:.4f} (base {base_eval['ppl']:.4f}); "
          f"‖expert − base‖/‖base‖ = {residual / norm:.4f}; wrote {file}")
    if not beats:
        print(f"train_adapters: FAILED: expert {args.name} does NOT beat the base on its own "
              f"held-out text", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    t_start = time.perf_counter()
    s2lc_home = Path(os.environ.get("S2LC_HOME", Path.home() / ".cache" / "s2lc"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", type=Path, required=True, help="domain text (UTF-8)")
    ap.add_argument("--name", required=True, help="adapter name")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default $S2LC_HOME/adapters/NAME)")
    ap.add_argument("--models-dir", type=Path, default=s2lc_home / "models")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 x rank)")
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module names")
    ap.add_argument("--seq", type=int, default=256, help="training and evaluation window (ids)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak AdamW learning rate (default 1e-3 for LoRA, 1e-4 for experts)")
    ap.add_argument("--mode", choices=("lora", "experts"), default="lora",
                    help="lora: a PEFT LoRA adapter; experts: fine-tune the full FFN of "
                         "--expert-layers and add it to the expert set --expert-set")
    ap.add_argument("--expert-layers", default=None,
                    help="comma-separated layer indices (default every third layer: 0,3,6,...)")
    ap.add_argument("--expert-set", default="ffn-every3",
                    help="expert set name; written to $S2LC_HOME/experts/NAME")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=float, default=0.1, help="held-out fraction at the end")
    ap.add_argument("--reference-prompt", default=PROMPT, help="prompt of the fixture logits")
    ap.add_argument("--fixture", type=Path, default=None,
                    help="also write a Rust test fixture into this directory")
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 1e-3 if args.mode == "lora" else 1e-4
    if args.mode == "experts" and args.fixture is not None:
        ap.error("--fixture is for LoRA adapters")
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if float(args.alpha).is_integer():
        args.alpha = int(args.alpha)  # written as "lora_alpha": 8, as in most PEFT configs
    if args.out is None:
        args.out = (s2lc_home / "adapters" / args.name if args.mode == "lora"
                    else s2lc_home / "experts" / args.expert_set)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not 0.0 < args.heldout < 1.0:
        ap.error("--heldout must be in (0, 1)")

    gguf_path = args.models_dir / GGUF_FILE
    for p in (gguf_path, args.text):
        if not p.is_file():
            print(f"train_adapters: missing {p} (run scripts/fetch-assets)", file=sys.stderr)
            return 1

    torch.set_num_threads(args.threads)
    # Late in training, small gradients and Adam moments fall into subnormal floats, which x86
    # CPUs handle in microcode: steps slowed from 5 s to 30 s here. Flushing them to zero changes
    # no result at the precision reported.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.models_dir, gguf_file=GGUF_FILE)
    base = AutoModelForCausalLM.from_pretrained(
        args.models_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    base.eval()
    assert base.config.vocab_size == VOCAB, base.config.vocab_size

    # ---- data ------------------------------------------------------------------------------------
    with open(args.text, "r", encoding="utf-8") as f:  # text mode: CRLF -> LF
        text = f.read()
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    n_tokens = len(ids)
    heldout_start = int(math.floor(n_tokens * (1.0 - args.heldout)))
    if heldout_start < args.seq + args.batch or n_tokens - heldout_start < args.seq:
        print(f"train_adapters: text too short ({n_tokens} ids) for --seq {args.seq}",
              file=sys.stderr)
        return 1

    # Prompt ids as crosscheck_smollm2.py: tokenizer(PROMPT) with its default special tokens, which
    # for this GGUF adds no BOS (tokenizer.ggml.add_bos_token = false); checked equal to
    # add_special_tokens=False.
    prompt_ids = list(tok(args.reference_prompt)["input_ids"])
    assert prompt_ids == list(tok(args.reference_prompt, add_special_tokens=False)["input_ids"])
    bos_added = tok.bos_token_id is not None and prompt_ids[0] == tok.bos_token_id

    # ---- base model measurements (before any LoRA layer is injected) -----------------------------
    t0 = time.perf_counter()
    base_eval = heldout_ppl(base, ids, heldout_start, args.seq)
    base_logits = last_logits(base, prompt_ids)
    print(f"base held-out ppl {base_eval['ppl']:.4f} over {base_eval['scored']} tokens "
          f"({base_eval['windows']} windows of {args.seq} from id {heldout_start} of {n_tokens}) "
          f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    pristine = copy.deepcopy(base)  # untouched base for reloading the saved adapter

    if args.mode == "experts":
        return train_experts(args, base, ids, heldout_start, base_eval, gguf_path, t_start)

    # ---- training --------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                      lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(base, lcfg)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    losses, train_seconds, warmup = train_loop(model, params, ids, heldout_start, args)

    # ---- save in PEFT's layout and reload onto the untouched base --------------------------------
    args.out.mkdir(parents=True, exist_ok=True)
    # Machine-independent provenance instead of the local models directory transformers recorded.
    model.peft_config["default"].base_model_name_or_path = GGUF_FILE
    # save_embedding_layers=False: the embeddings are never targeted, and "auto" would look the
    # base model's config.json up on the Hugging Face Hub.
    model.save_pretrained(str(args.out), save_embedding_layers=False)
    trained_logits = last_logits(model, prompt_ids)
    adapter = PeftModel.from_pretrained(pristine, str(args.out))  # unmerged, inference mode
    adapter.eval()
    adapter_logits = last_logits(adapter, prompt_ids)
    reload_diff = float(np.abs(adapter_logits - trained_logits).max())
    t0 = time.perf_counter()
    adapter_eval = heldout_ppl(adapter, ids, heldout_start, args.seq)
    print(f"adapter held-out ppl {adapter_eval['ppl']:.4f} (base {base_eval['ppl']:.4f}) "
          f"[{time.perf_counter() - t0:.1f} s]; reloaded vs in-memory logits max abs diff "
          f"{reload_diff:.3g}", flush=True)

    from safetensors import safe_open
    with safe_open(str(args.out / "adapter_model.safetensors"), framework="pt") as f:
        tensor_names = sorted(f.keys())
        tensor_dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in tensor_names})

    beats = adapter_eval["ppl"] < base_eval["ppl"]
    tail = losses[-10:]
    vers = versions()
    sha = {GGUF_FILE: sha256_file(gguf_path), args.text.name: sha256_file(args.text)}
    record = {
        "generated_by": "scripts/reference/train_adapters.py",
        "name": args.name,
        "model_file": GGUF_FILE,
        "text": args.text.name,
        "text_tokens": n_tokens,
        "heldout_start_token": heldout_start,
        "seq": args.seq,
        "heldout_windows": base_eval["windows"],
        "heldout_tokens_scored": base_eval["scored"],
        "base_heldout_ppl": base_eval["ppl"],
        "adapter_heldout_ppl": adapter_eval["ppl"],
        "base_heldout_mean_nll": base_eval["mean_nll"],
        "adapter_heldout_mean_nll": adapter_eval["mean_nll"],
        "adapter_beats_base": beats,
        "steps": args.steps,
        "final_train_loss": losses[-1],
        "final_train_loss_mean_last10": sum(tail) / len(tail),
        "train_losses": losses,
        "trainable_parameters": n_trainable,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "reload_max_abs_diff": reload_diff,
        "adapter_tensors": len(tensor_names),
        "adapter_tensor_dtypes": tensor_dtypes,
        "adapter_tensor_example": tensor_names[0],
        "schedule": f"AdamW(wd=0), linear warm-up {warmup} steps then cosine to 0, grad-norm clip 1.0",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": vers,
        "sha256": sha,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (args.out / "s2lc_training.json").write_text(dump_json(record))
    print(f"wrote {args.out} ({', '.join(ADAPTER_FILES)}, s2lc_training.json); "
          f"{len(tensor_names)} tensors, e.g. {tensor_names[0]}")

    if not beats:
        print(f"train_adapters: FAILED: the adapter does NOT beat the base model on its own held-out "
              f"text: adapter ppl {adapter_eval['ppl']:.4f} >= base ppl {base_eval['ppl']:.4f} "
              f"(no fixture written)", file=sys.stderr)
        return 1

    # ---- fixture ---------------------------------------------------------------------------------
    if args.fixture is not None:
        fdir = args.fixture
        fdir.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            shutil.copyfile(args.out / name, fdir / name)
        logits_path = fdir / "reference_logits.f32"
        # The base logits are those of crosscheck_smollm2.py's fixture when the prompt is the same.
        base_check = None
        smol = REPO / "tests" / "fixtures" / "smollm2_prompt_logits.f32"
        if args.reference_prompt == PROMPT and smol.is_file():
            ref_base = np.frombuffer(smol.read_bytes(), dtype="<f4")
            base_check = float(np.abs(ref_base.astype(np.float64) - base_logits).max())
        logits_path.write_bytes(adapter_logits.tobytes())
        ref = {
            "generated_by": "scripts/reference/train_adapters.py",
            "name": args.name,
            "model_file": GGUF_FILE,
            "adapter_files": list(ADAPTER_FILES),
            "rank": args.rank,
            "alpha": args.alpha,
            "targets": targets,
            "prompt": args.reference_prompt,
            "prompt_ids": prompt_ids,
            "bos_added": bool(bos_added),
            "logits_file": logits_path.name,
            "logits_format": (f"{VOCAB} little-endian f32, last prompt position, vocabulary order; "
                              "PeftModel (unmerged) loaded from the adapter files, eval, no grad"),
            "logits_min": float(adapter_logits.min()),
            "logits_max": float(adapter_logits.max()),
            "logits_argmax": int(adapter_logits.argmax()),
            "base_logits_argmax": int(base_logits.argmax()),
            "adapter_vs_base_max_abs_diff": float(
                np.abs(adapter_logits.astype(np.float64) - base_logits.astype(np.float64)).max()),
            "base_vs_smollm2_fixture_max_abs_diff": base_check,
            "text": args.text.name,
            "heldout_start_token": heldout_start,
            "seq": args.seq,
            "heldout_tokens_scored": base_eval["scored"],
            "base_heldout_ppl": base_eval["ppl"],
            "adapter_heldout_ppl": adapter_eval["ppl"],
            "heldout_protocol": (
                "text mode read (CRLF->LF); tokenize whole text, add_special_tokens=False (no BOS); "
                "independent full windows of seq ids from heldout_start_token, stride seq, fresh "
                "context each; NLL of window tokens 1..seq-1 from float64 log_softmax of f32 logits, "
                "summed in float64; ppl = exp(sum / heldout_tokens_scored)"),
            "versions": vers,
            "sha256": sha,
            "threads": torch.get_num_threads(),
            "date": record["date"],
        }
        (fdir / "reference.json").write_text(dump_json(ref))
        size = sum(p.stat().st_size for p in fdir.iterdir() if p.is_file())
        print(f"wrote fixture {fdir}: {size} bytes; argmax adapter {ref['logits_argmax']} base "
              f"{ref['base_logits_argmax']}, max |adapter - base| "
              f"{ref['adapter_vs_base_max_abs_diff']:.4f}")
        if size > FIXTURE_MAX_BYTES:
            print(f"train_adapters: fixture {fdir} is {size} bytes > {FIXTURE_MAX_BYTES}",
                  file=sys.stderr)
            return 1
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
