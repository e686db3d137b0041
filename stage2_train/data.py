"""Training data over the feature cache: a split's audio taps joined with its manifest.

Items are read from memory when the table fits (one bulk read per shard), from disk otherwise
(one read per item). Batches are global (the same on every rank) and sliced per rank, so two
ranks of batch B see exactly what one rank of batch 2B sees.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil

from shared.cache import FeatureCache, file_sha256
from shared.errors import BadInput
from shared.manifest import read_chunks


class Ragged:
    """(frames, offsets) in memory, or a cache table read item by item."""

    def __init__(self, table, in_memory: bool):
        self.table = table
        if in_memory:
            frames, offsets = table.load()
            self.frames, self.offsets = frames, offsets
        else:
            self.frames = None
        self.lengths = table.lengths()

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.frames is not None:
            return self.frames[self.offsets[i]:self.offsets[i + 1]]
        return self.table.item(i)

    def items(self, idx) -> list[np.ndarray]:
        return [self[int(i)] for i in idx]


def want_in_memory(setting: str, nbytes: int) -> bool:
    if setting in ("yes", "true"):
        return True
    if setting in ("no", "false"):
        return False
    return nbytes < 0.3 * psutil.virtual_memory().available


class SplitData:
    """One split: audio taps, each chunk's term ids, pseudo-terms and chunk-text index, no-term flags."""

    def __init__(self, cache: FeatureCache, split: str, in_memory: str = "auto", limit: int = 0):
        self.cache, self.split = cache, split
        table = cache.table(f"audio/{split}")
        self.audio = Ragged(table, want_in_memory(in_memory, table.nbytes()))
        manifest = Path(cache.index["manifests"][split])
        expected = cache.fingerprint["manifests"][split]
        if not manifest.is_file() or file_sha256(manifest) != expected:
            raise BadInput(f"the manifest of split {split!r} changed or vanished since extraction",
                           file=manifest, fix="re-run extract for the current manifests")
        by_id = {c.id: c for c in read_chunks(manifest)}
        key_to_id = {k: i for i, k in enumerate(cache.read_json("glossary.json")["keys"])}
        text_to_idx = {t: i for i, t in enumerate(cache.read_json("chunk_texts.json"))}
        self.ids = table.ids
        self.terms: list[list[int]] = []
        self.pseudo: list[list[str]] = []      # pseudo-term texts per chunk (pseudo.json's entries)
        self.text_index = np.zeros(len(self.ids), dtype=np.int64)
        for n, cid in enumerate(self.ids):
            c = by_id[cid]
            self.terms.append([key_to_id[t] for t in c.terms])
            self.pseudo.append(list(c.pseudo_terms))
            self.text_index[n] = text_to_idx[c.term_chunk_text]
        # a pseudo-term chunk has no glossary term but a target: it is not a no-term chunk
        self.noterm = np.array([not t and not p for t, p in zip(self.terms, self.pseudo)], dtype=bool)
        self.n = len(self.ids) if not limit else min(limit, len(self.ids))

    def __len__(self):
        return self.n


def global_batches(terms: list[list[int]], n: int, batch_size: int, seed: int, epoch: int,
                   dedup: bool = True, subset: np.ndarray | None = None) -> list[np.ndarray]:
    """The epoch's batches of item indices (same on every rank for the same seed and epoch).

    With `dedup`, an item whose term is already in the batch waits for a later batch, so a term
    is at most once per batch (masking handles duplicates anyway; this keeps negatives useful).
    """
    rng = np.random.default_rng([seed, epoch])
    # `subset`: the items this epoch uses (e.g. without pseudo-term chunks after the curriculum)
    order = rng.permutation(n) if subset is None else np.asarray(subset)[rng.permutation(len(subset))]
    if not dedup:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    batches, pending = [], list(order)
    while pending:
        batch, used, rest = [], set(), []
        for i in pending:
            t = terms[i]
            if len(batch) < batch_size and not used.intersection(t):
                batch.append(i)
                used.update(t)
            else:
                rest.append(i)
        batches.append(np.array(batch, dtype=np.int64))
        pending = rest
    return batches
