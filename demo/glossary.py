"""The demo glossary: real-world terms a speech translator must get right.

Owns `demo/data/terms.tsv` (term, category, one-sentence description, aliases separated by
";") and its conversion into the users' glossary formats: the seed's dict keyed by the lowercased
term, and `alt2main.json` mapping each lowercased alias to its lowercased main term.

Terms and aliases are one to four plain words of ASCII letters, so that eSpeak NG speaks them
as words and the spoken words match the glossary key exactly (no digits, hyphens or symbols).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

TERMS_TSV = Path(__file__).with_name("data") / "terms.tsv"
CATEGORIES = ("technology", "drug", "medical", "company", "place", "person", "science",
              "organization", "economics", "law")

_TERM_RE = re.compile(r"^[A-Za-z]+( [A-Za-z]+){0,3}$")


@dataclass(frozen=True)
class DemoTerm:
    term: str
    category: str
    description: str
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.term.lower()


def load_demo_terms(path: str | Path = TERMS_TSV) -> list[DemoTerm]:
    """Read and check the terms file; errors name the line and the fix."""
    path = Path(path)
    terms: list[DemoTerm] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header != ["term", "category", "description", "aliases"]:
            raise ValueError(f"{path}, line 1: header must be term, category, description, aliases "
                             f"(tab separated); got {header}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 4:
                raise ValueError(f"{path}, line {line_no}: expected 4 tab-separated columns, "
                                 f"got {len(row)}")
            term, category, description, alias_field = (c.strip() for c in row)
            aliases = tuple(a.strip() for a in alias_field.split(";") if a.strip())
            for name in (term, *aliases):
                if not _TERM_RE.match(name):
                    raise ValueError(f"{path}, line {line_no}: {name!r} must be 1-4 words of ASCII "
                                     "letters so eSpeak speaks it as written; respell it")
                if name.lower() in seen:
                    raise ValueError(f"{path}, line {line_no}: {name!r} repeats line "
                                     f"{seen[name.lower()]}; keep one")
                seen[name.lower()] = line_no
            if category not in CATEGORIES:
                raise ValueError(f"{path}, line {line_no}: unknown category {category!r}; "
                                 f"use one of {', '.join(CATEGORIES)}")
            if not description.endswith(".") or len(description) > 120:
                raise ValueError(f"{path}, line {line_no}: the description must be one short "
                                 "sentence ending with a full stop")
            terms.append(DemoTerm(term, category, description, aliases))
    return terms


def glossary_dict(terms: list[DemoTerm]) -> dict[str, dict]:
    """The seed's glossary format, keyed by the lowercased term."""
    return {t.key: {"term": t.term, "short_description": t.description,
                    "target_translations": {}, "url": ""} for t in terms}


def alt2main(terms: list[DemoTerm]) -> dict[str, str]:
    """{alias lowercased: main term lowercased}."""
    return {alias.lower(): t.key for t in terms for alias in t.aliases}


def lexicon(terms: list[DemoTerm]) -> dict[str, str]:
    """Every spoken form (term or alias, lowercased) to the main term it counts as."""
    out = {t.key: t.key for t in terms}
    out.update(alt2main(terms))
    return out
