"""The glossary: terms, their aliases, and the one normalisation every stage uses.

A term's identity is its normalised main key (lowercased, NFKC, single spaces, outer punctuation
stripped from each word). An alias from alt2main.json counts as its main term everywhere:
matching in transcripts, training positives, evaluation. Term ids are positions in
`Glossary.keys` (sorted, so the same glossary always gives the same ids).

Accepted glossary files (README, "Input formats"):
- the seed's dict: {"nintendo": {"term": "Nintendo", "short_description": ..., ...}, ...}
- a JSON list of strings (or of dicts with a "term" field)
- a text file with one term per line
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import BadInput

_PUNCT = ".,;:!?\"'()[]{}«»“”‘’"


def normalize(text: str) -> str:
    """Case-insensitive, punctuation-insensitive key of a term or a word sequence."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = (w.strip(_PUNCT) for w in text.split())
    return " ".join(w for w in words if w)


def word_ngrams(words: list[str], max_n: int):
    """(start, end exclusive, words joined by one space) of every run of 1..max_n consecutive words."""
    for i in range(len(words)):
        for n in range(1, min(max_n, len(words) - i) + 1):
            yield i, i + n, " ".join(words[i:i + n])


def ngram_matches(words: list[str], forms: dict, max_n: int) -> list[tuple[int, int, object]]:
    """Every run of 1..max_n words that is a key of `forms` (normalised words, normalised forms):
    (start, end exclusive, forms[run]), in order of start then length. The one n-gram matcher of the
    project: prepare finds terms with it, the demo checks its sentences with it."""
    return [(i, j, forms[g]) for i, j, g in word_ngrams(words, max_n) if g in forms]


@dataclass
class Glossary:
    keys: list[str]                                       # main keys; index = term id
    entries: dict[str, dict]                              # main key -> entry (at least "term")
    aliases: dict[str, str] = field(default_factory=dict)  # alias key -> main key
    source: str = ""

    def __post_init__(self):
        self._id = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def canonical(self, text: str) -> str | None:
        """Main key for a term or alias (any case), or None when it is not in the glossary."""
        key = normalize(text)
        key = self.aliases.get(key, key)
        return key if key in self._id else None

    def id(self, text: str) -> int:
        key = self.canonical(text)
        if key is None:
            raise KeyError(text)
        return self._id[key]

    def surface_forms(self) -> dict[str, str]:
        """Every spoken form (main keys and aliases) -> main key; what `prepare` matches."""
        forms = {k: k for k in self.keys}
        forms.update(self.aliases)
        return forms

    def text(self, term_id: int, field: str = "term") -> str:
        """What the text side embeds for a term: the entry's `field` (seed's text_field)."""
        entry = self.entries[self.keys[term_id]]
        value = entry.get(field) or entry.get("term") or self.keys[term_id]
        return str(value)

    def texts(self, field: str = "term") -> list[str]:
        return [self.text(i, field) for i in range(len(self.keys))]


def _read_entries(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise BadInput("glossary file does not exist", file=path, fix="check --glossary / data.glossary")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"not UTF-8 text (byte {e.start})", file=path, fix="re-encode the file as UTF-8") from None
    entries: dict[str, dict] = {}

    def add(term, entry: dict, where) -> None:
        entry = _checked_entry(entry, path, where)
        if not isinstance(term, str):
            raise BadInput(f"term {term!r} is not a string", file=path, record=where, fix='give "term": "..."')
        key = normalize(term)
        if not key:
            raise BadInput("empty term", file=path, record=where, fix="remove the entry")
        if key not in entries:  # a repeated term keeps its first entry: same key, same id
            entries[key] = {**entry, "term": entry.get("term") or term}

    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadInput(f"invalid JSON at line {e.lineno}: {e.msg}", file=path) from None
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, dict):
                    add(v.get("term") or k, v, repr(k))
                elif isinstance(v, str):
                    add(v or k, {"term": v or k}, repr(k))
                else:
                    raise BadInput(f"entry {k!r} must be an object with a 'term' field", file=path,
                                   fix='use {"key": {"term": "...", ...}}')
        elif isinstance(data, list):
            for i, v in enumerate(data):
                if isinstance(v, str):
                    add(v, {"term": v}, f"item {i}")
                elif isinstance(v, dict) and isinstance(v.get("term"), str):
                    add(v["term"], v, f"item {i}")
                else:
                    raise BadInput(f"item {i} is neither a string nor an object with 'term'", file=path)
        else:
            raise BadInput("a glossary JSON must be an object or a list", file=path)
    else:
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                add(line.strip(), {"term": line.strip()}, lineno)
    if not entries:
        raise BadInput("glossary is empty", file=path)
    return entries


# The entry fields the tool reads (the text side embeds `term` or data.text_field; query shows the
# description and translations); others are kept as they are.
_ENTRY_TEXT = ("term", "short_description")


def _checked_entry(entry: dict, path: Path, where) -> dict:
    """A glossary entry with the fields the tool reads checked: strings where text is expected, a
    {language: string} object of translations; null fields are dropped (as if absent)."""
    out = {k: v for k, v in entry.items() if v is not None}
    for name in _ENTRY_TEXT:
        if name in out and not isinstance(out[name], str):
            raise BadInput(f"field {name!r} is {out[name]!r}, not a string", file=path, record=where,
                           fix=f'give "{name}": "..." or leave the field out')
    tr = out.get("target_translations")
    if tr is not None and not (isinstance(tr, dict) and all(isinstance(v, str) for v in tr.values())):
        raise BadInput(f"target_translations is {tr!r}", file=path, record=where,
                       fix='give {"de": "...", "zh": "..."} (one string per language) or leave it out')
    return out


def read_alt2main(path: str | Path) -> dict[str, str]:
    """alias -> main, both normalised, chains followed to their end; a cycle is an error."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("alt2main file does not exist", file=path, fix="check --alt2main / data.alt2main")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"not a valid UTF-8 JSON object: {e}", file=path) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise BadInput('alt2main must be a JSON object {"alias": "main term"}', file=path)
    empty = next((k for k, v in data.items() if not normalize(k) or not normalize(v)), None)
    if empty is not None:
        raise BadInput(f"alias {empty!r} -> {data[empty]!r}: an empty alias or main term", file=path,
                       record=repr(empty), fix="remove the entry or give both terms")
    raw = {normalize(k): normalize(v) for k, v in data.items() if normalize(k) != normalize(v)}
    resolved = {}
    for alias in raw:
        seen = [alias]
        main = raw[alias]
        while main in raw:
            if main in seen:
                chain = " -> ".join(seen + [main])
                raise BadInput(f"alias cycle: {chain}", file=path, record=repr(alias),
                               fix="point every alias at a main term that is not itself an alias")
            seen.append(main)
            main = raw[main]
        resolved[alias] = main
    return resolved


def load_glossary(path: str | Path, alt2main: str | Path | None = None, *, log=print) -> Glossary:
    """Read a glossary (any accepted format) and its alias map into one normalised Glossary."""
    path = Path(path)
    entries = _read_entries(path)
    aliases = read_alt2main(alt2main) if alt2main else {}
    # An alias that is also a glossary key is folded into its main term, so it is never a
    # separate term that could act as a negative of itself.
    dropped = [a for a, m in aliases.items() if m not in entries]
    for a in dropped:
        del aliases[a]
    if dropped and log:
        log(f"{alt2main}: ignored {len(dropped)} aliases whose main term is not in the glossary "
            f"(e.g. {dropped[0]!r} -> {read_alt2main(alt2main)[dropped[0]]!r})")
    for alias in aliases:
        entries.pop(alias, None)
    keys = sorted(entries)
    return Glossary(keys=keys, entries={k: entries[k] for k in keys}, aliases=aliases, source=str(path))
