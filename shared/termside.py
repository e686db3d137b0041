"""What the text side reads, and the glossary rows that search goes through.

Stage 1 caches, beside the LM states, the *forms* of every text it embeds (`forms.json`): the
spelling and (with a G2P) the pronunciation of each glossary form, chunk text and distractor.
Stages 2 and 3 turn forms into hashed n-gram ids (`gram_ids`: the hashing is a model setting, so
it can change without touching the cache) and batch them with the LM states (`TermTable`).

A glossary term is searched through one or more *rows*: its main form and each alias, since an
alias is spelled and pronounced differently (an alias counts as its main term everywhere).
`owner[row]` is the term id a row stands for; rows 0..G-1 are the main forms in term-id order, so
`owner[t] == t` for them, and alias rows follow, sorted by alias. Rankings over rows are folded
into rankings over distinct term ids with `rows_to_terms`.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from shared.cache import FeatureCache
from shared.errors import BadInput
from shared.glossary import normalize

FORMS_VERSION = 1
NGRAM = (1, 4)
_SALT = {"chars": b"c\x00", "phones": b"p\x00"}


# ---------------------------------------------------------------- forms (stage 1 caches them)

def glossary_forms(glossary: dict) -> tuple[list[str], np.ndarray]:
    """(form texts, owner) of the glossary rows, from the cache's glossary.json dict
    ({"keys", "aliases", "texts", "text_field"}): main forms first in id order, then aliases."""
    keys = glossary["keys"]
    id_of = {k: i for i, k in enumerate(keys)}
    # the written form of a main term is its display text when the text side embeds the term
    # itself, its key otherwise (a description is not how a term is written)
    mains = glossary["texts"] if glossary.get("text_field", "term") == "term" else keys
    aliases = sorted(glossary.get("aliases", {}).items())
    forms = list(mains) + [a for a, _ in aliases]
    owner = np.array(list(range(len(keys))) + [id_of[m] for _, m in aliases], dtype=np.int64)
    return forms, owner


def forms_of(texts: list[str], g2p: str = "espeak") -> dict:
    """{"spell": [...], "phones": [...] or None} for texts: what the form encoders read."""
    spell = [normalize(t) for t in texts]
    phones = None
    if g2p == "espeak":
        from shared.g2p import phonemize
        phones = phonemize(spell)
    elif g2p != "none":
        raise BadInput(f"unknown G2P {g2p!r}", file="config [text]", fix="set text.g2p to espeak or none")
    return {"spell": spell, "phones": phones}


def forms_fingerprint(groups: dict[str, list[str]], g2p: str) -> dict:
    from shared.g2p import g2p_fingerprint
    h = hashlib.sha256(json.dumps(groups, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {"version": FORMS_VERSION, "g2p": g2p_fingerprint(g2p), "texts_sha256": h}


def write_forms(cache: FeatureCache, g2p: str = "espeak", log=print) -> bool:
    """Cache the forms of the glossary rows, chunk texts and distractors (forms.json); True when
    (re)computed. Cheap (a few seconds for 10^5 texts) and independent of the hidden states, so
    it is redone whenever the texts or the G2P change, without touching the rest of the cache."""
    groups = {"glossary": glossary_forms(cache.read_json("glossary.json"))[0],
              "chunks": cache.read_json("chunk_texts.json")}
    if (cache.root / "distractors.json").is_file():
        groups["distractors"] = cache.read_json("distractors.json")
    if (cache.root / "pseudo.json").is_file():
        groups["pseudo"] = cache.read_json("pseudo.json")
    fp = forms_fingerprint(groups, g2p)
    path = cache.root / "forms.json"
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("fingerprint") == fp:
                return False
        except json.JSONDecodeError:
            pass
    out = {"fingerprint": fp}
    for name, texts in groups.items():
        out[name] = forms_of(texts, g2p)
    cache.write_json("forms.json", out)
    if log:
        log(f"forms of {sum(len(t) for t in groups.values())} texts cached in {path} (G2P: {g2p})")
    return True


# ---------------------------------------------------------------- n-gram ids (stages 2 and 3)

def gram_ids(text: str, kind: str, buckets: int, ngram=NGRAM) -> np.ndarray:
    """Hashed character n-gram ids of a spelling or a phone string (words padded with spaces, so
    n-grams at word edges differ from those inside). crc32 keeps ids the same in every process."""
    s = f" {text} "
    salt = _SALT[kind]
    lo, hi = ngram
    grams = {g for n in range(lo, hi + 1) for i in range(len(s) - n + 1) if (g := s[i:i + n]).strip()}
    ids = sorted(zlib.crc32(salt + g.encode("utf-8")) % buckets for g in grams)
    return np.asarray(ids, dtype=np.int64)


def form_grams(forms: dict, encoders, buckets: int, ngram=NGRAM) -> list[np.ndarray]:
    """Per text, the union of its spelling and/or phone n-gram ids (as the text side's encoders
    ask); an empty text gets one id so that the bag has something to average."""
    kinds = [k for k in ("chars", "phones") if k in encoders]
    if "phones" in kinds and forms.get("phones") is None:
        raise BadInput("the text side reads phones but the cache has no pronunciations",
                       file="forms.json", fix="extract with text.g2p = espeak, or drop phones from text.encoders")
    n = len(forms["spell"])
    out = []
    for i in range(n):
        parts = [gram_ids(forms["spell" if k == "chars" else "phones"][i], k, buckets, ngram) for k in kinds]
        ids = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        out.append(ids if len(ids) else np.zeros(1, np.int64))
    return out


# ---------------------------------------------------------------- tables of text-side inputs

@dataclass
class TermTable:
    """Inputs of the text side for N items: LM states (by `lm_index` into `lm`) and n-gram ids."""
    lm: list | None                # LM tap states per source item (None when the side has no lm part)
    lm_index: np.ndarray           # (N,) item -> index into lm
    grams: list | None             # (N,) arrays of n-gram ids, or None without form parts
    owner: np.ndarray | None = None  # glossary rows only: row -> term id

    def __len__(self) -> int:
        return len(self.lm_index)

    def batch(self, idx, device="cpu", gram_dropout: float = 0.0, rng=None) -> dict:
        """Keyword arguments of `TextSide.forward` for items `idx`. With `gram_dropout` (training only)
        each n-gram id is dropped with that probability (one always stays), so a term cannot be
        recognised by one memorised n-gram and its vector must come from many: what an unseen term,
        which shares only some of its n-grams with training terms, needs."""
        from shared.heads import pad_batch
        idx = [int(i) for i in idx]
        out = {}
        if self.lm is not None:
            out["lm_x"], out["lm_mask"] = pad_batch([self.lm[self.lm_index[i]] for i in idx], device)
        if self.grams is not None:
            parts = [self.grams[i] for i in idx]
            if gram_dropout > 0:
                rng = rng or np.random.default_rng()
                kept = []
                for p in parts:
                    keep = rng.random(len(p)) >= gram_dropout
                    keep[min(int(rng.random() * len(p)), len(p) - 1)] = True
                    kept.append(p[keep])
                parts = kept
            lengths = np.array([len(p) for p in parts], dtype=np.int64)
            out["gram_ids"] = torch.from_numpy(np.concatenate(parts)).to(device)
            out["gram_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]])).to(device)
        return out

    def concat(self, other: "TermTable") -> "TermTable":
        """Rows of self, then rows of other (e.g. glossary rows, then pseudo-terms)."""
        lm = None if self.lm is None else list(self.lm) + list(other.lm)
        lm_index = np.concatenate([self.lm_index, other.lm_index + (len(self.lm) if self.lm is not None else 0)])
        grams = None if self.grams is None else list(self.grams) + list(other.grams)
        return TermTable(lm, lm_index, grams)

    def lengths(self) -> np.ndarray:
        if self.lm is not None:
            return np.array([len(self.lm[j]) for j in self.lm_index])
        return np.zeros(len(self), dtype=np.int64)


def _items(table) -> list[np.ndarray]:
    frames, offsets = table.load()
    return [frames[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _read_forms(cache: FeatureCache) -> dict:
    path = cache.root / "forms.json"
    if not path.is_file():
        raise BadInput("the feature cache has no forms.json (spellings/pronunciations of its texts)",
                       file=cache.root, fix="rerun `python -m stage1_extract extract` on it: it adds them "
                                            "without recomputing the hidden states")
    return json.loads(path.read_text(encoding="utf-8"))


def text_options(spec: dict) -> tuple[list[str], int, tuple[int, int]]:
    return list(spec.get("text_encoders", ["lm"])), int(spec.get("buckets", 1 << 16)), \
        tuple(spec.get("ngram", NGRAM))


def term_tables(cache: FeatureCache, spec: dict, names=("glossary", "chunks")) -> dict[str, TermTable]:
    """TermTables for the cache's glossary rows ("glossary", with `.owner`), chunk texts ("chunks")
    and distractors ("distractors"), as the model `spec` (text_encoders, buckets, ngram) reads them."""
    encoders, buckets, ngram = text_options(spec)
    forms = _read_forms(cache) if any(e != "lm" for e in encoders) else None
    out = {}
    for name in names:
        lm = _items(cache.table(f"text/{name}")) if "lm" in encoders else None
        if name == "glossary":
            _, owner = glossary_forms(cache.read_json("glossary.json"))
            lm_index = owner                                   # an alias reads its main term's LM states
        else:
            n = len(cache.table(f"text/{name}"))
            lm_index, owner = np.arange(n), None
        grams = None
        if forms is not None:
            if name not in forms:
                raise BadInput(f"forms.json has no {name!r} texts", file=cache.root,
                               fix="rerun `python -m stage1_extract extract` on this cache")
            grams = form_grams(forms[name], encoders, buckets, ngram)
        out[name] = TermTable(lm, np.asarray(lm_index, dtype=np.int64), grams, owner)
    return out


# ---------------------------------------------------------------- embedding and search helpers

@torch.no_grad()
def embed_table(text_side, table: TermTable, batch_size: int = 1024, device="cpu", idx=None) -> np.ndarray:
    """(N, P) float32 embeddings of a TermTable's items (or of `idx`), in order."""
    idx = np.arange(len(table)) if idx is None else np.asarray(idx, dtype=np.int64)
    order = np.argsort(table.lengths()[idx], kind="stable")      # positions in idx, shortest first
    out = np.zeros((len(idx), text_side.proj_dim), dtype=np.float32)
    was = text_side.training
    text_side.eval()
    with torch.no_grad():     # inference: no autograd graph (it doubled a 100,000-row pass)
        for b in range(0, len(order), batch_size):
            part = order[b:b + batch_size]
            out[part] = text_side(**table.batch(idx[part], device)).float().cpu().numpy()
    text_side.train(was)
    return out


def side_spec(text_side) -> dict:
    """The reading options (`term_tables` spec) of a built text side."""
    return {"text_encoders": text_side.encoders, "buckets": text_side.buckets, "ngram": text_side.ngram}


def embed_glossary(model, cache: FeatureCache, spec: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (R, P) float32, owner (R,) int64): every searchable row of the cache's glossary."""
    spec = spec if spec is not None else side_spec(model.text)
    table = term_tables(cache, spec, ("glossary",))["glossary"]
    return embed_table(model.text, table), table.owner


def embed_text_table(model, cache: FeatureCache, name: str, spec: dict | None = None) -> np.ndarray:
    """(N, P) float32 embeddings of a cached text table (`text/<name>`), one row per item."""
    spec = spec if spec is not None else side_spec(model.text)
    return embed_table(model.text, term_tables(cache, spec, (name,))[name])


def spoken_rows(chunk_text: str, term_ids, forms: list[str], owner: np.ndarray, rows_of: dict) -> list[int]:
    """For each gold term of a chunk, the row of the form actually spoken in its text (an alias row
    when the alias is what was said), the main row otherwise."""
    text = f" {normalize(chunk_text)} "
    out = []
    for t in term_ids:
        best = t
        for r in rows_of.get(t, ()):
            if r != t and f" {normalize(forms[r])} " in text:
                best = r
                break
        out.append(best)
    return out


def rows_to_terms(row_ids: np.ndarray, row_scores: np.ndarray, owner: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Fold ranked rows (C, R') into the k best distinct term ids (C, k) and their scores.

    A term's score is its best row's; -1 / -inf pad when fewer than k distinct terms were found, so
    search a few rows deeper than k when terms have several rows.
    """
    row_ids = np.asarray(row_ids)
    C = len(row_ids)
    ids = np.full((C, k), -1, dtype=np.int64)
    scores = np.full((C, k), -np.inf, dtype=np.float32)
    for c in range(C):
        n = 0
        seen = set()
        for r, s in zip(row_ids[c], row_scores[c]):
            if r < 0:
                continue
            t = int(owner[r])
            if t in seen:
                continue
            seen.add(t)
            ids[c, n], scores[c, n] = t, s
            n += 1
            if n == k:
                break
    return ids, scores
