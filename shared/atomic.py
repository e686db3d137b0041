"""Writing files so that a killed process never leaves one that looks finished.

Everything a rerun trusts (manifests, shard marks, checkpoints, indexes, reports) is written under a
temporary name beside its place (same filesystem, so the rename is atomic) and renamed last.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; it replaces `path` when the block ends without an error and
    is removed when the block fails. The name keeps `path`'s suffix (some writers choose the format by
    it) and carries the process id (two writers never share a temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
