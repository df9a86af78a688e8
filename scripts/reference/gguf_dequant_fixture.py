#!/usr/bin/env python3
"""Write the GGUF dequantization fixtures in tests/fixtures/gguf/.

    $VENV/bin/python scripts/reference/gguf_dequant_fixture.py [--model PATH] [--out DIR]

For every ggml type in the SmolLM2 GGUF ($S2LC_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched
by scripts/fetch-assets) it takes the first tensor of that type (file order) and stores the raw
bytes of its first rows together with gguf-py's dequantization of them (`gguf.quants.dequantize`).
For the types absent from that file it makes blocks itself, deterministically (numpy seed below):
types gguf-py can quantize (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized from seeded
normal data with a few edge blocks (all zeros, constant, tiny and large values); the k-quants
(Q2_K..Q6_K), which gguf-py only decodes, get random bytes with finite f16 scale fields (including a
negative and a subnormal scale). Either way the expected values are gguf-py's dequantization.

Output, read by the Rust test `quant::tests::matches_gguf_py_fixtures` (bit-exact comparison) and
by `tests/gguf_real.rs` (which also checks the real-file bytes against the model file):
    index.json         {"cases": [{name, type, type_id, source, n_elements, bytes, values, ...}], ...}
    <name>.bin         the raw ggml blocks
    <name>.f32         the expected values, little-endian f32, in storage (row-major) order
Needs the `gguf` and `numpy` packages (scripts/reference/setup-venv installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from fixture_io import sha256_file

SEED = 20250611
REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Elements of synthetic data per quantizable type: two rows of 256.
SYNTH_SHAPE = (2, 256)
# Super-blocks of crafted k-quant data per type.
K_BLOCKS = 4
# Byte offsets of the f16 scale fields inside one block of each k-quant type (ggml-common.h).
K_SCALE_FIELDS = {
    T.Q2_K: [80, 82],  # scales[16] qs[64] | d | dmin
    T.Q3_K: [108],  # hmask[32] qs[64] scales[12] | d
    T.Q4_K: [0, 2],  # d | dmin | scales[12] qs[128]
    T.Q5_K: [0, 2],  # d | dmin | scales[12] qh[32] qs[128]
    T.Q6_K: [208],  # ql[128] qh[64] scales[16] | d
}
QUANTIZABLE = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]



def dequant(raw: np.ndarray, qtype: T) -> np.ndarray:
    """gguf-py's dequantization of raw blocks shaped (rows, row_bytes), as flat f32."""
    out = gguf.quants.dequantize(raw, qtype)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)


def write_case(out_dir: Path, cases: list, name: str, qtype: T, raw: np.ndarray, source: str, **extra):
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    values = dequant(raw, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.size * block_size == values.size * type_size, name
    assert np.isfinite(values).all(), f"{name}: non-finite expected values"
    (out_dir / f"{name}.bin").write_bytes(raw.tobytes())
    (out_dir / f"{name}.f32").write_bytes(values.astype("<f4").tobytes())
    cases.append(
        {
            "name": name,
            "type": qtype.name,
            "type_id": int(qtype),
            "source": source,
            "n_elements": int(values.size),
            "bytes": f"{name}.bin",
            "values": f"{name}.f32",
            **extra,
        }
    )
    print(f"  {name:<16} {qtype.name:<5} {values.size:6d} elements, {raw.size:6d} bytes  ({source})")


def real_cases(model: Path, out_dir: Path, cases: list) -> dict:
    reader = gguf.GGUFReader(str(model))
    seen = set()
    with open(model, "rb") as f:
        for t in reader.tensors:
            qtype = T(t.tensor_type)
            if qtype in seen:
                continue
            seen.add(qtype)
            dims = [int(d) for d in t.shape]  # ggml order: dims[0] is the row length
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = dims[0] // block_size * type_size
            rows = min(2, int(np.prod(dims[1:])) if len(dims) > 1 else 1)
            f.seek(int(t.data_offset))
            raw = np.frombuffer(f.read(rows * row_bytes), dtype=np.uint8).reshape(rows, row_bytes)
            write_case(
                out_dir,
                cases,
                f"real_{qtype.name.lower()}",
                qtype,
                raw,
                f"{model.name}: {t.name}, first {rows} row(s) of {dims[0]}",
                tensor=t.name,
                file_offset=int(t.data_offset),
                rows=rows,
            )
    return {"file": model.name, "sha256": sha256_file(model)}


def synthetic_data(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(SYNTH_SHAPE).astype(np.float32) * np.float32(0.05)
    x[1, 0:32] = 0.0  # an all-zero block: scale 0
    x[1, 32:64] = 0.75  # a constant block: max == min
    x[1, 64:96] *= np.float32(1e-4)  # tiny values (f16 subnormal scales)
    x[1, 96:128] *= np.float32(400.0)  # large values
    return x


def synthetic_quantized(out_dir: Path, cases: list, rng: np.random.Generator):
    data = synthetic_data(rng)
    for qtype in QUANTIZABLE:
        q = gguf.quants.quantize(data, qtype)
        raw = q.view(np.uint8).reshape(data.shape[0], -1)
        write_case(
            out_dir,
            cases,
            f"synth_{qtype.name.lower()}",
            qtype,
            raw,
            f"gguf.quants.quantize of seeded normal data {SYNTH_SHAPE} with edge blocks",
        )


def synthetic_k_quants(out_dir: Path, cases: list, rng: np.random.Generator):
    for qtype, fields in K_SCALE_FIELDS.items():
        _, type_size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(K_BLOCKS, type_size), dtype=np.uint8)
        scales = rng.uniform(0.0005, 0.05, size=(K_BLOCKS, len(fields))).astype(np.float16)
        scales[1, 0] = -scales[1, 0]  # a negative scale
        scales[2, -1] = np.float16(3e-6)  # a subnormal f16
        for j, off in enumerate(fields):
            raw[:, off : off + 2] = scales[:, j : j + 1].view(np.uint8)
        write_case(
            out_dir,
            cases,
            f"synth_{qtype.name.lower()}",
            qtype,
            raw,
            f"{K_BLOCKS} random super-blocks with finite f16 scales",
        )


def main() -> int:
    s2lc_home = Path(os.environ.get("S2LC_HOME", Path.home() / ".cache" / "s2lc"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=s2lc_home / "models" / MODEL_NAME)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "gguf")
    args = ap.parse_args()
    if not args.model.is_file():
        print(f"gguf_dequant_fixture: {args.model} not found (run scripts/fetch-assets)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for old in list(args.out.glob("*.bin")) + list(args.out.glob("*.f32")):
        old.unlink()

    cases: list = []
    print(f"writing {args.out}")
    model = real_cases(args.model, args.out, cases)
    rng = np.random.default_rng(SEED)
    synthetic_quantized(args.out, cases, rng)
    synthetic_k_quants(args.out, cases, rng)

    index = {
        "generator": "scripts/reference/gguf_dequant_fixture.py",
        "gguf_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy_version": np.__version__,
        "seed": SEED,
        "model": model,
        "cases": cases,
    }
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{len(cases)} cases, {total} bytes")
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
