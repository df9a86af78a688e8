"""Helpers shared by the fixture-writing reference scripts in this directory: file hashes and the
compact JSON layout of the committed fixtures. Imported as a sibling module (the scripts run as
`python scripts/reference/NAME.py`, which puts this directory on sys.path)."""

import hashlib
import json
from pathlib import Path


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_json(obj, indent=2, ensure_ascii=True) -> str:
    """JSON with objects indented but lists of scalars kept on one line (compact fixtures)."""

    def dumps(x):
        return json.dumps(x, ensure_ascii=ensure_ascii)

    def enc(o, level):
        pad = " " * (indent * (level + 1))
        end = " " * (indent * level)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{pad}{dumps(k)}: {enc(v, level + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + end + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(x, (dict, list, tuple)) for x in o):
                return "[" + ", ".join(dumps(x) for x in o) + "]"
            return "[\n" + ",\n".join(pad + enc(x, level + 1) for x in o) + "\n" + end + "]"
        return dumps(o)

    return enc(obj, 0) + "\n"
