"""FAISS indexes over glossary embeddings, described by a factory string (`Flat`, `HNSW32`,
`IVF1024,Flat`, `IVF1024,PQ64`, ...): inner product on L2-normalised vectors = cosine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np

from shared.atomic import atomic_path, write_json_atomic
from shared.errors import BadInput


def build_index(vectors: np.ndarray, factory: str = "Flat", *, seed: int = 0, nprobe: int = 16,
                ef_search: int = 128, train_per_list: int = 256):
    """Build (and train, when the factory needs it) an inner-product index; on GPU when faiss has one.

    IVF quantisers train on up to `train_per_list` sampled vectors per list (256 is faiss's own cap; at
    1M x 512 that costs minutes on 2 cores, and anything well above faiss's minimum of 39 does)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    d = x.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BadInput(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}",
                       fix="use e.g. Flat, HNSW32, IVF1024,Flat or IVF1024,PQ64 (eval.index)") from None
    if not index.is_trained:
        n_train = min(len(x), train_per_list * max(1, _nlist(factory)))
        sample = x[np.random.default_rng(seed).choice(len(x), n_train, replace=False)] if n_train < len(x) else x
        if len(sample) < _nlist(factory):
            raise BadInput(f"index {factory!r} needs at least {_nlist(factory)} vectors to train, got {len(x)}",
                           fix="use Flat for small glossaries (eval.index=Flat)")
        index.train(sample)
    index.add(x)
    _set_search_params(index, nprobe, ef_search)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError):
            pass  # some index types have no GPU version; the CPU one answers the same queries
    return index


def pow2_nlist(n: int) -> int:
    """IVF list count for n vectors: the power of two nearest sqrt(n) (at least 16)."""
    return max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))


def _nlist(factory: str) -> int:
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits or 1)
    return 1


def _set_search_params(index, nprobe: int, ef_search: int) -> None:
    """Search-time knobs of approximate indexes; an index without the knob ignores it."""
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError:
            pass


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top k, ids -1 where the index holds fewer than k vectors."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(q, k)


def save_index(index, path: str | Path, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and \
        "Gpu" in type(index).__name__ else index
    with atomic_path(path) as tmp:
        faiss.write_index(cpu, str(tmp))
    write_json_atomic(Path(str(path) + ".json"), meta)


def load_index_if(path: str | Path, meta: dict):
    """The saved index if it was built from the same inputs (meta equal), else None."""
    path = Path(path)
    mp = Path(str(path) + ".json")
    if not path.is_file() or not mp.is_file():
        return None
    try:
        if json.loads(mp.read_text()) != json.loads(json.dumps(meta)):
            return None
        return faiss.read_index(str(path))
    except (RuntimeError, json.JSONDecodeError):
        return None  # a torn file from a killed run: rebuild it
