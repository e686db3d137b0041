"""The cascade baseline: what users would do instead of our retriever.

Transcribe a chunk with an ASR model (stage1_extract.transcribe), then rank the glossary terms by
how well one of their written forms (main term, display text, aliases) fuzzily matches a stretch of
the transcript. Pure functions on strings; no file I/O.

Scorers (SCORERS; eval.cascade_scorer picks the cascade baseline's, while "ours + transcript" and the
Retriever's transcript evidence use DEFAULT_SCORER), each a similarity in [0, 1] of a form to the
transcript, both normalised (`shared.glossary.normalize`):

- "words": max over the transcript's word n-grams with about the form's number of words (n-1 .. n+1
  words) of 1 - Levenshtein(form, n-gram) / max(len(form), len(n-gram)), on characters. An exact
  word match scores 1.0; "playstation" against "play station" scores 1 - 1/12.
- "partial": rapidfuzz `fuzz.partial_ratio(form, transcript) / 100`: the best alignment of the shorter
  string anywhere inside the longer one, ignoring word boundaries (Indel similarity); what a user
  reaching for rapidfuzz would write. "ai" scores 1.0 against any transcript saying "said".
- "phones": "words" on eSpeak NG phonemes (shared.g2p) of the form and of the transcript, so that
  "cooper nettis" is near "kubernetes".
- "words+phones": the mean of "words" and "phones".

A term's score is the best of its forms; the top k distinct terms are returned, ties broken by term
id (smaller first) so the ranking is deterministic.

The default, "words+phones", was chosen on the demo's dev split (eSpeak voices, Whisper tiny.en in its
30 s window, 564 queries): R@1/5/10 .278/.367/.406 against "words" .255/.333/.367, "phones"
.266/.349/.376, "partial" .220/.296/.339 (max instead of mean of words and phones: .273/.356/.392).
Reported, not chosen on: held-out Piper voice (337 queries) .748/.840/.866 against "words"
.706/.801/.825, "phones" .727/.810/.846, "partial" .677/.760/.786; test .300/.380/.421, tied with
"phones" .291/.381/.423, above "words" .273/.341/.364 and "partial" .235/.309/.349. Its cost is eSpeak
NG (GPL-3.0, already the text side's G2P) phonemizing each transcript (~0.1 ms) and the forms once
(10,000 forms: 0.8 s), and two edit-distance passes: ~75 chunks/s against a 10,000-form glossary.

Speed: the edit distances run in rapidfuzz's C++ (`process.cdist`), over every form of the glossary
against the few n-grams of a ~2 s chunk (about ten n-grams per form): ~100k short pairs per chunk,
a few milliseconds. That is exact, so no character n-gram prefilter is needed at the demo's
glossary sizes (a prefilter would drop forms that share no 3-gram with the transcript but still
score ~0.5, e.g. "ai" against "ay").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from rapidfuzz import fuzz, process
from rapidfuzz.distance import Levenshtein

from shared.glossary import normalize, word_ngrams

SCORERS = ("words", "partial", "phones", "words+phones")
DEFAULT_SCORER = "words+phones"


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


class _WordGrams:
    """Forms grouped by word count; scores a text by normalised Levenshtein against its n-1..n+1-word n-grams."""

    def __init__(self, forms: Sequence[str]):
        self.n_forms = len(forms)
        by_words: dict[int, list[int]] = {}
        for j, f in enumerate(forms):
            by_words.setdefault(len(f.split()), []).append(j)
        # {word count: (form indices, form strings)}
        self.groups = {n: (np.asarray(ix, dtype=np.int64), [forms[j] for j in ix])
                       for n, ix in sorted(by_words.items()) if n > 0}
        self.max_words = max(self.groups, default=0) + 1

    def scores(self, text: str) -> np.ndarray:
        scores = np.zeros(self.n_forms, dtype=np.float32)
        grams = transcript_ngrams(text, self.max_words)
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


def _phonemes(texts: Sequence[str]) -> list[str]:
    from shared.g2p import phonemize
    return [normalize(p) for p in phonemize(list(texts))]


class CascadeMatcher:
    """A glossary's forms prepared once for one scorer (SCORERS); `rank` scores one transcript against it."""

    def __init__(self, forms: Sequence[str], owner: Sequence[int], scorer: str = DEFAULT_SCORER):
        if len(forms) != len(owner):
            raise ValueError(f"{len(forms)} forms but {len(owner)} owners; give one term id per form")
        if scorer not in SCORERS:
            raise ValueError(f"unknown cascade scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        self.scorer = scorer
        self.forms = list(forms)
        self.owner = np.asarray(owner, dtype=np.int64)
        self.n_terms = int(self.owner.max()) + 1 if len(self.owner) else 0
        self.words = _WordGrams(self.forms) if scorer in ("words", "words+phones") else None
        self.phones = _WordGrams(_phonemes(self.forms)) if scorer in ("phones", "words+phones") else None

    def form_scores(self, transcript: str) -> np.ndarray:
        """(n_forms,) float32: each form's similarity to the transcript in [0, 1] (0 when it is empty)."""
        if self.scorer == "partial":
            text = normalize(transcript)
            if not text or not self.forms:
                return np.zeros(len(self.forms), dtype=np.float32)
            return process.cdist([text], self.forms, scorer=fuzz.partial_ratio, dtype=np.float32,
                                 workers=1)[0] / 100.0
        if self.scorer == "words":
            return self.words.scores(transcript)
        said = _phonemes([transcript])[0] if normalize(transcript) else ""
        if self.scorer == "phones":
            return self.phones.scores(said)
        return (self.words.scores(transcript) + self.phones.scores(said)) / 2

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


def rank_terms(transcript: str, forms: Sequence[str], owner: Sequence[int], k: int,
               scorer: str = DEFAULT_SCORER) -> tuple[np.ndarray, np.ndarray]:
    """The k best distinct term ids for one transcript and their scores (see the module docstring)."""
    return CascadeMatcher(forms, owner, scorer).rank(transcript, k)


def rank_all(transcripts: Sequence[str], forms: Sequence[str], owner: Sequence[int], k: int,
             matcher: CascadeMatcher | None = None, scorer: str = DEFAULT_SCORER) -> tuple[np.ndarray, np.ndarray]:
    """rank_terms over many transcripts with the matcher built once: (ids (N, k), scores (N, k)).

    scores[:, 0] (each chunk's best match) is the cascade's rejection score.
    """
    m = matcher or CascadeMatcher(forms, owner, scorer)
    ids = np.full((len(transcripts), k), -1, dtype=np.int64)
    scores = np.zeros((len(transcripts), k), dtype=np.float32)
    for i, t in enumerate(transcripts):
        ids[i], scores[i] = m.rank(t, k)
    return ids, scores
