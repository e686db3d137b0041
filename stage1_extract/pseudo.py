"""Pseudo-terms: words and short n-grams of the training transcripts used as extra retrieval targets.

Glossary terms give a few hundred targets; a text side that reads a term's spelling and sound
learns that mapping better from thousands. A pseudo-term is an aligned word (or n-gram of words)
of a TRAIN segment that is not a glossary term; `prepare` cuts a chunk around it exactly as
around a term, and the chunk's target is the pseudo-term's written form.

What may become a pseudo-term (`pseudo_candidates`):
- its words lie outside every glossary term span of the segment;
- its first and last words are content words (not in `STOPWORDS`, no digits); inner words of a
  3+-gram may be stopwords ("state of mind");
- it has at least `min_letters` letters;
- none of its words is a word of any glossary form, and written solid it is no glossary form
  ("play station" vs PlayStation). `excluded_words` collects every word (and hyphen part, and
  the solid spelling) of every main term, alias and display text of the *whole* glossary, all
  splits together: this is what keeps dev/test terms unseen (a pseudo-term can never be, nor
  contain a word of, a dev or test term), at the price of also excluding words of train terms.
  Which split a term is spoken in is never consulted, so no split can leak into another.

Which candidates are kept (`pseudo_spans`) is a weighted random order: the weight of a candidate
is (its letters) ** `length_power`, so longer words are favoured (0 = uniform). Measure before
changing the defaults (../shared/NOTES.md: a naive mix hurt unseen terms).
"""
from __future__ import annotations

import random
import re
from typing import Iterable, NamedTuple

from shared.glossary import Glossary, normalize

# Function words, auxiliaries, pronouns, fillers and contractions of spoken English: the words a
# retriever should never be asked to find. Small on purpose; content words pass.
STOPWORDS = frozenset("""
a about above after again against all almost also although always am among an and another any
anybody anyone anything are around as at away back be became because been before being below
between both but by can cannot could did do does doing done down during each either else enough
even ever every few for from further get gets getting go goes going gone got had has have having
he her here hers herself him himself his how however i if in into is it its itself just kind
less let like lot lots many may maybe me might mine more most much must my myself need never no
nobody none nor not nothing now of off often on once one only onto or other others our ours
ourselves out over own per perhaps quite rather really same see seem seems she should since so
some somebody someone something sometimes still such than that the their theirs them themselves
then there these they thing things this those though through thus to together too toward towards
under until up upon us very via was way we well were what whatever when where whether which while
who whom whose why will with within without would yes yet you your yours yourself yourselves
uh um uhm hmm er erm ah oh okay ok yeah mean know actually basically right sort sorry anyway please
thank thanks hello bye
i'm i've i'll i'd you're you've you'll you'd he's he'll he'd she's she'll she'd it's it'll
we're we've we'll we'd they're they've they'll they'd that's there's here's what's who's where's
let's isn't aren't wasn't weren't don't doesn't didn't can't couldn't won't wouldn't shouldn't
hasn't haven't hadn't mustn't
""".split())


class PseudoSpan(NamedTuple):
    first: int          # index of the first word
    last: int           # index of the last word (inclusive)
    text: str           # normalised written form: what the text side embeds
    priority: float = 0.0   # weighted-random key: higher is taken first (pseudo_spans sets it)


def excluded_words(glossary: Glossary, extra: Iterable[str] = ()) -> frozenset[str]:
    """Every word of every glossary form (main keys, aliases, display texts) and of `extra` terms.

    The whole glossary, every split: the safe way to keep dev/test terms out of training."""
    forms = [normalize(f) for f in list(glossary.keys) + list(glossary.aliases) +
             [str(e.get("term", "")) for e in glossary.entries.values()] + list(extra)]
    # also the parts of hyphenated words and each form written solid ("play-station", "playstation"),
    # so that a spelling variant of a term in a transcript cannot slip through
    return frozenset(w for f in forms for w in f.split() + _parts(f) + [_solid(f)] if w)


def _parts(text: str) -> list[str]:
    return [p for w in text.split() for p in re.split(r"[-/]", w)]


def _solid(text: str) -> str:
    return re.sub(r"[\s\-/]", "", text)


def _letters(word: str) -> int:
    return sum(ch.isalpha() for ch in word)


def _content(word: str) -> bool:
    return bool(word) and word not in STOPWORDS and not any(ch.isdigit() for ch in word) \
        and _letters(word) >= 2


def pseudo_candidates(words, term_spans, excluded: frozenset[str] | set[str], max_ngram: int = 2,
                      min_letters: int = 4, max_gap: float = 0.1) -> list[PseudoSpan]:
    """Every word span that may become a pseudo-term (rules in the module docstring), in word order.
    An n-gram's words follow each other with at most `max_gap` seconds of silence between them, so
    it never runs across a pause (a sentence end, a hesitation): "call sorry" is not a phrase.

    `words` have `.text`, `.start`, `.end` (prepare's Word); `term_spans` have `.first` / `.last`
    (prepare's TermSpan: the glossary terms found in these words)."""
    norm = [normalize(w.text) for w in words]
    in_term = [False] * len(words)
    for sp in term_spans:
        for j in range(sp.first, sp.last + 1):
            in_term[j] = True
    usable = [not in_term[i] and bool(norm[i]) and not (set(norm[i].split() + _parts(norm[i])) & excluded)
              for i in range(len(words))]
    out = []
    for i in range(len(words)):
        for j in range(i, min(i + max_ngram, len(words))):
            if not usable[j]:       # an n-gram never crosses a term or an excluded word
                break
            if j > i and words[j].start - words[j - 1].end > max_gap:
                break
            if not (_content(norm[i]) and _content(norm[j])):
                continue
            text = " ".join(norm[i:j + 1])
            if _letters(text) < min_letters or _solid(text) in excluded:   # "play station"
                continue
            out.append(PseudoSpan(i, j, text))
    return out


def pseudo_spans(words, term_spans, glossary_words_excluded, rng: random.Random, max_ngram: int = 2,
                 min_letters: int = 4, length_power: float = 1.0, limit: int | None = None,
                 max_gap: float = 0.1) -> list[PseudoSpan]:
    """The candidates of one segment in a weighted random order (highest `priority` first), at most
    `limit`. Weight = letters ** length_power; the priority is u ** (1 / weight) (Efraimidis and
    Spirakis), so taking the top N of any pool of these spans, even pooled over many segments, is
    a weighted sample of N without replacement. Deterministic for the rng's state."""
    cands = pseudo_candidates(words, term_spans, glossary_words_excluded, max_ngram, min_letters, max_gap)
    out = []
    for c in cands:
        w = float(_letters(c.text)) ** length_power
        u = rng.random()
        out.append(c._replace(priority=u ** (1.0 / w) if w > 0 else u))
    out.sort(key=lambda s: (-s.priority, s.first, s.last))
    return out if limit is None else out[:limit]


def choose(pool: list, n: int, max_per_term: int = 0, key=lambda item: item) -> list:
    """The first n items of `pool` by descending priority, at most `max_per_term` (0 = no cap) per
    pseudo-term text, so a frequent word cannot crowd out the rest. `key(item)` -> its PseudoSpan."""
    order = sorted(range(len(pool)), key=lambda i: (-key(pool[i]).priority, i))
    taken, per = [], {}
    for i in order:
        if len(taken) >= n:
            break
        text = key(pool[i]).text
        if max_per_term and per.get(text, 0) >= max_per_term:
            continue
        per[text] = per.get(text, 0) + 1
        taken.append(pool[i])
    return taken
