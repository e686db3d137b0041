"""The cascade baseline: what users would do instead of our retriever.

Transcribe a chunk with an ASR model (stage1_extract.transcribe), then rank the glossary terms by
how well one of their written forms (main term, display text, aliases) fuzzily matches a stretch of
the transcript. Pure functions on strings; no file I/O.

Score of a form = max over the transcript's word n-grams with about the form's number of words
(n-1 .. n+1 words) of 1 - Levenshtein(form, n-gram) / max(len(form), len(n-gram)), on characters
of the normalised text (`shared.glossary.normalize`). An exact word match scores 1.0; "playstation"
against "play station" scores 1 - 1/12. A term's score is the best of its forms; the top k distinct
terms are returned, ties broken by term id (smaller first) so the ranking is deterministic.

Speed: the edit distances run in rapidfuzz's C++ (bit-parallel), over every form of the glossary
against the few n-grams of a ~2 s chunk (about ten n-grams per form): ~100k short pairs per chunk,
a few milliseconds. That is exact, so no character n-gram prefilter is needed at the demo's
glossary sizes (a prefilter would drop forms that share no 3-gram with the transcript but still
score ~0.5, e.g. "ai" against "ay").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from shared.glossary import normalize, word_ngrams


def term_forms(keys: Sequence[str], aliases: Mapping[str, str | int] | None = None,
               texts: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
    """Every written form of every term, normalised, and the term id (position in `keys`) it belongs to.

    keys: the glossary's main keys in id order; aliases: {alias: main key (or term id)} as in
    alt2main.json; texts: each term's display text (the glossary's "term" field, not a description).
    Forms are distinct per term, ordered by (term id, form); an alias whose main term is not in `keys`
    is ignored (as `load_glossary` does).
    """
    id_of = {normalize(k): i for i, k in enumerate(keys)}
    pairs: set[tuple[int, str]] = set()
    for i, k in enumerate(keys):
        pairs.add((i, normalize(k)))
        if texts is not None:
            pairs.add((i, normalize(texts[i])))
    for alias, main in (aliases or {}).items():
        owner = main if isinstance(main, int) else id_of.get(normalize(main))
        if owner is not None:
            pairs.add((int(owner), normalize(alias)))
    ordered = sorted((i, f) for i, f in pairs if f)
    return [f for _, f in ordered], [i for i, _ in ordered]


def transcript_ngrams(transcript: str, max_words: int) -> dict[int, list[str]]:
    """{n: every run of n consecutive words of the normalised transcript}, for n = 1 .. max_words."""
    out: dict[int, list[str]] = {}
    for i, j, gram in word_ngrams(normalize(transcript).split(), max_words):
        out.setdefault(j - i, []).append(gram)
    return out


class CascadeMatcher:
    """A glossary's forms grouped by word count, built once; `rank` scores one transcript against it."""

    def __init__(self, forms: Sequence[str], owner: Sequence[int]):
        if len(forms) != len(owner):
            raise ValueError(f"{len(forms)} forms but {len(owner)} owners; give one term id per form")
        self.forms = list(forms)
        self.owner = np.asarray(owner, dtype=np.int64)
        self.n_terms = int(self.owner.max()) + 1 if len(self.owner) else 0
        by_words: dict[int, list[int]] = {}
        for j, f in enumerate(self.forms):
            by_words.setdefault(len(f.split()), []).append(j)
        # {word count: (form indices, form strings)}
        self.groups = {n: (np.asarray(ix, dtype=np.int64), [self.forms[j] for j in ix])
                       for n, ix in sorted(by_words.items()) if n > 0}
        self.max_words = max(self.groups, default=0) + 1

    def form_scores(self, transcript: str) -> np.ndarray:
        """(n_forms,) float32: each form's best similarity to an n-gram of the transcript (0 when none)."""
        scores = np.zeros(len(self.forms), dtype=np.float32)
        grams = transcript_ngrams(transcript, self.max_words)
        if not grams:
            return scores
        for n, (ix, strings) in self.groups.items():
            queries = [g for m in (n - 1, n, n + 1) for g in grams.get(m, ())]
            if not queries:
                continue
            sim = process.cdist(queries, strings, scorer=Levenshtein.normalized_similarity,
                                dtype=np.float32, workers=1)
            scores[ix] = sim.max(axis=0)
        return scores

    def term_scores(self, transcript: str) -> np.ndarray:
        """(n_terms,) float32: each term's best form score."""
        out = np.zeros(self.n_terms, dtype=np.float32)
        np.maximum.at(out, self.owner, self.form_scores(transcript))
        return out

    def rank(self, transcript: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (k,) int64, scores (k,) float32): the k best distinct terms, -1 / 0 padded.

        Terms scoring 0 (no character in common with any n-gram) are never returned.
        """
        ids = np.full(k, -1, dtype=np.int64)
        top = np.zeros(k, dtype=np.float32)
        s = self.term_scores(transcript)
        hit = np.flatnonzero(s > 0)
        if hit.size == 0 or k <= 0:
            return ids, top
        order = hit[np.lexsort((hit, -s[hit]))][:k]   # by score descending, then term id ascending
        ids[:len(order)] = order
        top[:len(order)] = s[order]
        return ids, top


def rank_terms(transcript: str, forms: Sequence[str], owner: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best distinct term ids for one transcript and their scores (see the module docstring)."""
    return CascadeMatcher(forms, owner).rank(transcript, k)


def rank_all(transcripts: Sequence[str], forms: Sequence[str], owner: Sequence[int], k: int,
             matcher: CascadeMatcher | None = None) -> tuple[np.ndarray, np.ndarray]:
    """rank_terms over many transcripts with the matcher built once: (ids (N, k), scores (N, k)).

    scores[:, 0] (each chunk's best match) is the cascade's rejection score.
    """
    m = matcher or CascadeMatcher(forms, owner)
    ids = np.full((len(transcripts), k), -1, dtype=np.int64)
    scores = np.zeros((len(transcripts), k), dtype=np.float32)
    for i, t in enumerate(transcripts):
        ids[i], scores[i] = m.rank(t, k)
    return ids, scores
