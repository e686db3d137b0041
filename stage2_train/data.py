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

    def used_terms(self) -> set[int]:
        """Term ids of the chunks in use (the first `limit`): what a run trains on, what mining's
        mine_from="train" searches and what eval calls seen. Chunks past the limit do not count."""
        return {t for ts in self.terms[:self.n] for t in ts}

    def used_texts(self) -> list[str]:
        """The transcripts (term_chunk_text) of the chunks in use, in chunk order."""
        texts = self.cache.read_json("chunk_texts.json")
        return [texts[int(i)] for i in self.text_index[:self.n]]


def global_batches(terms: list[list[int]], n: int, batch_size: int, seed: int, epoch: int,
                   term_cap: int = 1, subset: np.ndarray | None = None, stats: dict | None = None
                   ) -> list[np.ndarray]:
    """The epoch's batches of item indices: the same on every rank for the same seed and epoch.

    Every batch is full except the epoch's last (ceil(n / B) batches). With `term_cap` > 0 no term is
    in more than `term_cap` items of a batch wherever that is possible: each term's items are dealt
    round-robin over the batches (largest terms first, while every batch still has room), so a term
    with at most as many items as there are batches never repeats in one. A term more frequent than
    that (the head of a Zipf distribution) cannot keep the cap; its overflow is spread as evenly as
    the dealing allows; `stats["overflow"]` counts the items placed over the cap and `stats["over_cap_terms"]`
    the terms too frequent to keep it (the loss masks repeated terms, so they are never each other's
    negatives: repeats only waste a slot). Linear in the number of items.
    """
    rng = np.random.default_rng([seed, epoch])
    # `subset`: the items this epoch uses (e.g. without pseudo-term chunks after the curriculum)
    items = np.arange(n) if subset is None else np.asarray(subset, dtype=np.int64)
    items = items[rng.permutation(len(items))]
    n_items = len(items)
    n_batches = -(-n_items // batch_size) if n_items else 0
    if term_cap <= 0 or n_batches <= 1:
        return [items[i:i + batch_size] for i in range(0, n_items, batch_size)]
    room = np.full(n_batches, batch_size, dtype=np.int64)
    room[-1] = n_items - batch_size * (n_batches - 1)
    # each item is dealt under its most frequent term (the hardest to spread); no-term items last
    freq: dict[int, int] = {}
    for i in items:
        for t in terms[i]:
            freq[t] = freq.get(t, 0) + 1
    groups: dict[int, list[int]] = {}
    free = []
    for i in items:
        if terms[i]:
            groups.setdefault(max(terms[i], key=lambda t: (freq[t], t)), []).append(int(i))
        else:
            free.append(int(i))
    order = sorted(groups, key=lambda t: (-len(groups[t]), rng.random()))
    # the next batch with room at or after b (cyclically): full batches point past themselves, and the
    # pointers are compressed as they are followed, so each full batch is skipped in amortised O(1)
    parent = list(range(n_batches))

    def open_at(b: int) -> int:
        root = b
        while room[root] == 0:
            root = parent[root] if parent[root] != root else (root + 1) % n_batches
        while b != root and room[b] == 0:
            step = parent[b] if parent[b] != b else (b + 1) % n_batches
            parent[b] = root
            b = step
        return root

    out = [[] for _ in range(n_batches)]
    count: list[dict[int, int]] = [{} for _ in range(n_batches)]
    overflow, b = 0, int(rng.integers(n_batches))
    for t in order:
        for i in groups[t]:
            b = open_at(b)
            target, probe = b, b
            for _ in range(min(4, n_batches)):          # a few batches ahead for one under the cap
                if all(count[probe].get(u, 0) < term_cap for u in terms[i]):
                    target = probe
                    break
                probe = open_at((probe + 1) % n_batches)
            else:
                overflow += 1
            out[target].append(i)
            room[target] -= 1
            for u in terms[i]:
                count[target][u] = count[target].get(u, 0) + 1
            b = (target + 1) % n_batches
    for i in free:
        b = open_at(b)
        out[b].append(i)
        room[b] -= 1
        b = (b + 1) % n_batches
    if stats is not None:
        stats["overflow"] = overflow
        stats["over_cap_terms"] = sum(1 for f in freq.values() if f > n_batches * term_cap)
    # the short batch stays last; the full ones in random order, each shuffled
    full = [np.array(x, dtype=np.int64)[rng.permutation(len(x))] for x in out[:-1]]
    last = np.array(out[-1], dtype=np.int64)[rng.permutation(len(out[-1]))]
    return [full[j] for j in rng.permutation(len(full))] + [last]
