#!/usr/bin/env python3
"""Reference token ids for S2LC's tokenizer (crates/s2lc-model/src/tokenizer.rs).

Run with the reference venv (see scripts/reference/setup-venv):

    $S2LC_REF_VENV/bin/python scripts/reference/tokenizer_fixture.py [--llama-tokenize PATH]

Writes tests/fixtures/tokenizer/tokenizer_reference.json (regenerate it with this script, never edit
it by hand), checked by crates/s2lc-model/tests/tokenizer_real.rs.

SmolLM2 (SmolLM2-135M-Instruct.Q4_1.gguf, tokenizer.ggml.pre = "smollm")
    The tokenizer is loaded by transformers from the GGUF:
    AutoTokenizer.from_pretrained(<models dir>, gguf_file=...). Its vocabulary, merges and special
    tokens are what S2LC must reproduce, but its pre-tokenizer is not: transformers (5.23) has no
    rule for the "smollm" tag and falls back to GPT-2's byte-level regex alone, while llama.cpp
    (and SmolLM2's own tokenizer.json) first split every digit off (\\p{N}), then apply the GPT-2
    regex. The two differ where whitespace runs precede a digit ("a  1": transformers
    a|Ġ|Ġ|1, llama.cpp a|ĠĠ|1), e.g. in lcet10.txt and plrabn12.txt.
    So the expected ids ("ids") come from the same transformers tokenizer with its pre-tokenizer
    set to llama.cpp's smollm rule: Sequence[Digits(individual_digits=True),
    ByteLevel(add_prefix_space=False, use_regex=True)]. transformers' unmodified ids are recorded
    next to them ("transformers_*") so the difference stays visible.
    With --llama-tokenize (llama.cpp's `llama-tokenize`, e.g. built from the llama.cpp sources
    vendored in the llama-cpp-python sdist: `cmake -B build && cmake --build build --target
    llama-tokenize`), every expected id list is also checked against llama.cpp (parse special
    tokens on, no BOS) and the run fails on any difference; "llama_cpp_checked" records it.

    texts: each Canterbury text, read in Python text mode (UTF-8, universal newlines: CRLF -> LF),
        encoded with add_special_tokens=False. count = number of ids; fnv1a64 = FNV-1a 64-bit hash
        (offset 0xcbf29ce484222325, prime 0x100000001b3) of the ids as little-endian u32 bytes, as
        16 lowercase hex digits; prefix = the first PREFIX_LEN ids.
    strings: short tricky strings (digits, unicode, whitespace runs, chat special tokens,
        contractions, Python code from the python-docs tutorial) with their full ids.
    add_bos_default: whether transformers' tokenizer(text) puts BOS first (tokenizer.ggml.add_bos_token).

all-MiniLM-L6-v2 (tokenizer.json, BERT WordPiece)
    minilm.strings: ids from transformers' AutoTokenizer on the model directory with
    add_special_tokens=True ([CLS] ... [SEP]), no truncation, no padding.
"""

import argparse
import ast
import copy
import datetime
import os
import platform
import struct
import subprocess
import sys
import tempfile
from importlib.metadata import version as pkg_version
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from fixture_io import dump_json, sha256_file

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = "all-MiniLM-L6-v2"
TEXTS = ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt"]
PREFIX_LEN = 2000
# The python-docs snippet: PYDOC_LINES lines starting at the line containing PYDOC_MARKER.
PYDOC_FILE = "tutorial/controlflow.rst.txt"
PYDOC_MARKER = ">>> def fib2(n):"
PYDOC_LINES = 12

STRINGS = [
    "12345 3.14159",
    "In 1865, 42 (or 007) items cost $3,000.50 -- 1st, 2nd, 10th.",
    "a  1\n\n 2\t3   45",
    "naïve café — ☕ 日本語",
    "Ünïcödé: Ελληνικά, русский, עברית, العربية, 한국어, emoji 🦀👍🏽 and a zero\u200bwidth space",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\nand \r\n carriage returns\r",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after the end",
    "I'll don't WE'RE they've she'd it's",
    "",
    " ",
]

MINILM_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — ☕ 日本語, tokenization of UNKNOWN-ish words!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
]

# Checksums of the assets as fetched by scripts/fetch-assets (docs/architecture.md "Assets").
EXPECTED_SHA256 = {
    GGUF_FILE: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "alice29.txt": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "asyoulik.txt": "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    "lcet10.txt": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    "plrabn12.txt": "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
}

REPO = Path(__file__).resolve().parents[2]



def fnv1a64(ids) -> str:
    """FNV-1a 64 of the ids as little-endian u32 bytes (the Rust test computes the same)."""
    h = 0xCBF29CE484222325
    for byte in struct.pack(f"<{len(ids)}I", *ids):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"



def read_text(path: Path) -> str:
    """Python text mode: UTF-8, universal newlines (CRLF and lone CR -> LF)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class LlamaCpp:
    """llama.cpp's tokenizer through its `llama-tokenize` tool (vocabulary only, no weights)."""

    def __init__(self, exe: Path, gguf: Path):
        self.exe, self.gguf = exe, gguf

    def encode(self, text: str):
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", suffix=".txt", delete=False) as f:
            f.write(text)
            name = f.name
        try:
            out = subprocess.run(
                [str(self.exe), "-m", str(self.gguf), "-f", name, "--ids", "--no-escape", "--no-bos", "--log-disable"],
                capture_output=True, text=True, check=True,
            ).stdout
        finally:
            os.unlink(name)
        return ast.literal_eval(out.strip().splitlines()[-1])


def main() -> int:
    home = Path(os.environ.get("S2LC_HOME", Path.home() / ".cache" / "s2lc"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=home / "models")
    ap.add_argument("--text-dir", type=Path, default=home / "text")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "tokenizer" / "tokenizer_reference.json")
    ap.add_argument("--llama-tokenize", type=Path, help="llama.cpp's llama-tokenize, to check the expected ids")
    args = ap.parse_args()

    gguf_path = args.models_dir / GGUF_FILE
    text_paths = {name: args.text_dir / "canterbury" / name for name in TEXTS}
    sha = {GGUF_FILE: sha256_file(gguf_path)} | {n: sha256_file(p) for n, p in text_paths.items()}
    for name, digest in sha.items():
        if digest != EXPECTED_SHA256[name]:
            print(f"tokenizer_fixture: {name} has sha256 {digest}, expected {EXPECTED_SHA256[name]}", file=sys.stderr)
            return 1

    tok = AutoTokenizer.from_pretrained(str(args.models_dir), gguf_file=GGUF_FILE)
    # llama.cpp's "smollm" pre-tokenizer on transformers' vocabulary, merges and special tokens.
    smollm = copy.deepcopy(tok.backend_tokenizer)
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    llama = LlamaCpp(args.llama_tokenize, gguf_path) if args.llama_tokenize else None

    def expected_ids(text: str):
        ids = smollm.encode(text, add_special_tokens=False).ids
        if llama is not None:
            ref = llama.encode(text)
            if ref != ids:
                i = first_difference(ids, ref)
                raise SystemExit(
                    f"tokenizer_fixture: llama.cpp disagrees on {text[:40]!r}... at id {i}: "
                    f"{ids[i:i + 5]} vs {ref[i:i + 5]} ({len(ids)} vs {len(ref)} ids)"
                )
        return ids

    probe = "Hello"
    add_bos_default = tok(probe)["input_ids"][:1] == [tok.bos_token_id] if tok.bos_token_id is not None else False

    texts = {}
    for name, path in text_paths.items():
        text = read_text(path)
        ids = expected_ids(text)
        hf = tok.encode(text, add_special_tokens=False)
        entry = {"chars": len(text), "count": len(ids), "fnv1a64": fnv1a64(ids)}
        entry["transformers_equal"] = hf == ids
        if hf != ids:
            entry["transformers_count"] = len(hf)
            entry["transformers_fnv1a64"] = fnv1a64(hf)
            entry["transformers_first_difference"] = first_difference(ids, hf)
        entry["prefix"] = ids[:PREFIX_LEN]
        texts[name] = entry
        print(f"tokenizer_fixture: {name}: {len(ids)} ids (transformers {len(hf)})", file=sys.stderr)

    pydoc = read_text(args.text_dir / "python-docs" / PYDOC_FILE).split("\n")
    start = next(i for i, line in enumerate(pydoc) if PYDOC_MARKER in line)
    snippet = "\n".join(pydoc[start:start + PYDOC_LINES]) + "\n"

    strings = []
    for text in STRINGS + [snippet]:
        ids = expected_ids(text)
        hf = tok.encode(text, add_special_tokens=False)
        entry = {"text": text, "ids": ids}
        if hf != ids:
            entry["transformers_ids"] = hf
        strings.append(entry)

    minilm = AutoTokenizer.from_pretrained(str(args.models_dir / MINILM_DIR))
    minilm_strings = [
        {"text": t, "ids": minilm(t, add_special_tokens=True, truncation=False, padding=False)["input_ids"]}
        for t in MINILM_STRINGS
    ]

    fixture = {
        "generated_by": "scripts/reference/tokenizer_fixture.py",
        "model_file": GGUF_FILE,
        "expected_ids": "transformers' GGUF tokenizer with llama.cpp's smollm pre-tokenizer "
        "(Digits(individual_digits=True) then ByteLevel(use_regex=True)); transformers_* = unmodified transformers",
        "llama_cpp_checked": llama is not None,
        "checksum": "fnv1a64 of the ids as little-endian u32 bytes",
        "text_read": "Python text mode, UTF-8, universal newlines (CRLF -> LF)",
        "add_special_tokens": False,
        "vocab_size": len(tok),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "add_bos_default": add_bos_default,
        "prefix_len": PREFIX_LEN,
        "texts": texts,
        "pydoc_snippet_from": PYDOC_FILE,
        "strings": strings,
        "minilm": {"model_dir": MINILM_DIR, "add_special_tokens": True, "strings": minilm_strings},
        "versions": {
            "python": platform.python_version(),
            "transformers": pkg_version("transformers"),
            "tokenizers": pkg_version("tokenizers"),
            "gguf": pkg_version("gguf"),
        },
        "sha256": sha,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump_json(fixture, ensure_ascii=False), encoding="utf-8")
    print(f"tokenizer_fixture: wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
