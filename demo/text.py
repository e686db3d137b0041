"""Carrier sentences for the demo corpus: templates, fillers, and the check that a sentence
holds exactly the glossary terms it was built around.

Templates are generic on purpose (a lecture, a meeting, an interview), so the context around a
slot does not give away which term fills it. Each split (train, dev, test and the held-out voice)
has its own carriers, openers, closers and no-term sentences (`CARRIERS`, a fixed partition, most
of it train's): otherwise a model could learn the evaluated splits' term-free sentences as
"no term here" and the carriers' words around a slot, and rejection and retrieval would look
better on test than on new speech. Everything here is pure: a numpy Generator in, text and
word-level term spans out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from shared.glossary import ngram_matches

SPLITS = ("train", "dev", "test", "heldout")


@dataclass(frozen=True)
class Carriers:
    """One split's own sentences. `one_term` templates have a {T} slot, `two_term` ones {T} and
    {U}; `no_term` sentences and `closers` also pad segments up to their length."""
    one_term: tuple[str, ...]
    two_term: tuple[str, ...]
    no_term: tuple[str, ...]
    openers: tuple[str, ...]
    closers: tuple[str, ...]

    def all(self) -> tuple[str, ...]:
        return self.one_term + self.two_term + self.no_term + self.openers + self.closers


# A fixed partition: every template belongs to exactly one split (tests/test_demo_corpus.py checks
# that no two splits share one, up to case and punctuation), most of them to train. Each evaluated
# split has its term positions mixed like train's: a term first, in the middle, last.
CARRIERS = {
    "train": Carriers(
        one_term=(
            "I read a long article about {T} on the train this morning.",
            "Can you explain what {T} actually means in this context?",
            "We will come back to {T} after the short break.",
            "She mentioned {T} twice during the meeting yesterday.",
            "The next slide is all about {T}, so please pay attention.",
            "Honestly, I had never heard of {T} before last week.",
            "There is a lot of confusion about {T} these days.",
            "Let me write {T} on the board so everybody can see it.",
            "According to the report, {T} played a central role.",
            "My colleague keeps talking about {T} at lunch.",
            "I think {T} deserves a much closer look.",
            "Nobody in the room knew much about {T}.",
            "Our guest today will talk about {T} for twenty minutes.",
            "The headline this morning was about {T} again.",
            "Please remember the name {T}, it will be on the exam.",
            "Before we start, a quick word about {T}.",
            "It took me a while to understand {T} properly.",
            "In the second part we compare {T} with the alternatives.",
            "The episode last night focused on {T}.",
            "They asked me to summarise {T} in one sentence.",
            "Most of the students had questions about {T}.",
            "What do you personally think about {T}?",
            "My notes say {T}, but I am not completely sure.",
            "The interpreter asked the speaker to repeat {T}.",
            "Every time someone says {T}, the room goes quiet.",
            "We spent most of the afternoon reading about {T}.",
            "The short answer is {T}, and the long answer is complicated.",
            "If you search for {T}, you will find plenty of material.",
            "I was surprised how often {T} came up in the interviews.",
            "A friend of mine works on {T} full time.",
            "So the main topic for today is {T}.",
            "The newsletter had a section on {T} this week.",
            "Please add {T} to the list of keywords.",
            "Last year the whole meeting was about {T}.",
            "I would not have guessed {T} was the answer.",
            "He pronounced {T} in a way I did not expect.",
            "Have you ever looked into {T} yourself?",
            "The committee will discuss {T} on Monday.",
            "To be fair, {T} is not easy to explain.",
            "You will hear the name {T} quite a lot in this course.",
            "That was the first time I saw {T} mentioned in the news.",
            "The speaker went on to describe {T} in some detail.",
            "Somebody in the back asked about {T}.",
            "Our team lead sent everyone a link about {T}.",
            "In my opinion, {T} gets too little attention.",
            "The book has a whole chapter on {T}.",
            "Then the conversation turned to {T}.",
            "I wrote {T} in the margin and moved on.",
            "There was a quiz question about {T} last night.",
            "The phrase {T} appears three times in the transcript.",
            "Let me just check my notes on {T}.",
            "When I heard {T}, I had to look it up.",
            "The subtitles got {T} wrong, which was funny.",
            "Everyone seems to have an opinion on {T}.",
            "Could we have a short overview of {T} first?",
            "The lecture ended with a few remarks on {T}.",
            "The final report mentions {T} on page four.",
            "I need to read up on {T} before the call.",
            "That is exactly why {T} matters here.",
            "They put {T} at the top of the agenda.",
            "The host kept repeating {T} all morning.",
            "Here is a simple way to remember {T}.",
            "One of the panelists is an expert on {T}.",
            "The lecturer drew a diagram to explain {T}.",
            "I heard an interview about {T} on the radio.",
            "Most of the chapter deals with {T}.",
            "We took a vote on {T} at the end.",
            "The slides for {T} are still missing.",
            "Somebody should write a proper guide to {T}.",
            "{T} is the one thing I remember from that talk.",
        ),
        two_term=(
            "First we look at {T}, and then we move on to {U}.",
            "Some people confuse {T} with {U}, but they are quite different.",
            "The article compared {T} and {U} in a lot of detail.",
            "I wrote down {T} and {U}, but I missed the rest.",
            "Yesterday we covered {T}, today it is {U}.",
            "The speaker jumped from {T} straight to {U}.",
            "My notes mention {T} right next to {U}.",
            "We have two items left, {T} and {U}.",
            "Is {T} related to {U} in any way?",
            "After the part about {T}, someone asked about {U}.",
            "The slides cover {T} first and {U} at the end.",
            "The report links {T} to {U}, which surprised me.",
            "She talked about {T} for ten minutes and then about {U}.",
            "Please translate {T} and {U} consistently.",
            "The interview touched on {T} and, briefly, on {U}.",
            "He mentioned {T}, and a little later {U}.",
            "The list includes {T}, along with {U}.",
            "You cannot really discuss {T} without mentioning {U}.",
            "In the morning {T}, in the afternoon {U}.",
            "The question was whether {T} has anything to do with {U}.",
            "I heard {T} and then, a bit later, {U}.",
            "Both {T} and {U} came up during the discussion.",
            "The two keywords for today are {T} and {U}.",
            "Let me say a few words on {T} before we get to {U}.",
            "The morning session was on {T}, the evening one on {U}.",
            "I still do not see how {T} connects to {U}.",
        ),
        no_term=(
            "Okay, let us get started, we have a lot to cover today.",
            "Could you close the door, please? It is a bit noisy outside.",
            "That is a really good question, thank you for asking.",
            "We will take a short break in about ten minutes.",
            "Let me see if I can find the right slide.",
            "I think we are running a little behind schedule.",
            "Please keep your questions until the end of the session.",
            "So where were we? Ah yes, let me continue.",
            "I will send the notes to everyone this evening.",
            "My microphone was switched off for a moment, sorry about that.",
            "We should probably wrap up soon, it is getting late.",
            "Thank you all for coming, it is great to see so many people here.",
            "If you cannot see the screen, feel free to move closer.",
            "Let me just repeat that more slowly for the interpreters.",
            "I remember the first time I gave this talk, nothing worked.",
            "The schedule for tomorrow is slightly different from today.",
            "I am going to skip the next part because of time.",
            "Raise your hand if you have done something like this before.",
            "Well, that did not go exactly as planned, but never mind.",
            "We can talk about the details later over lunch.",
            "Sorry, could you say that one more time, a little louder?",
            "I think that covers most of what I wanted to say.",
            "Let us hear from someone who has not spoken yet.",
            "It is interesting how quickly the time goes by.",
            "I wanted to share a short story before we continue.",
            "Honestly, I did not expect so many questions today.",
            "The recording will be available next week.",
            "Let me check the time, we still have about twenty minutes.",
            "That is all I have for this section, more or less.",
            "I see a few new faces today, welcome everybody.",
            "Can everyone see my screen now? Good.",
            "We are almost at the end, so bear with me.",
            "I will try to keep this part short and simple.",
            "Just a quick reminder that the room is booked until five.",
            "Right, I think we can move on to the next point.",
            "It was a long day, and I am sure you are all tired.",
            "I will put the exercises online after the session.",
            "Let me just find my notes, they were here a minute ago.",
            "We might finish a bit early today, which is nice.",
            "Is the sound okay for everyone joining from home?",
            "I am going to stop here for a moment and take questions.",
            "The room next door is quite loud, so I will speak up.",
            "Thanks again to everyone who helped organise this.",
            "We will pick this up again next time.",
            "Let me start with a quick look back at last week.",
        ),
        openers=("Okay, so.", "Right.", "Alright, next.", "So, moving on.", "Good, thank you.",
                 "Let me see.", "Well, okay.", "Alright then."),
        closers=("That is all for now.", "Any questions so far?", "Does that make sense?",
                 "Let us keep going.", "Okay, next point.", "Right, moving on.", "Anyway.",
                 "Good, let us continue."),
    ),
    "dev": Carriers(
        one_term=(
            "Could you spell {T} for the people taking notes?",
            "He wrote his whole thesis on {T}.",
            "{T} was the word I could not catch.",
            "The translator paused when the speaker said {T}.",
            "Let us look at {T} from a different angle.",
            "{T} is the topic of the next session.",
            "Our professor asked us to read about {T} over the weekend.",
            "The radio host mentioned {T} right before the news.",
            "I made a short note about {T} in my diary.",
            "Someone on the phone asked me about {T} this afternoon.",
            "The museum guide stopped to tell us about {T}.",
            "We argued about {T} for almost an hour.",
            "Her presentation started with a few words on {T}.",
            "Does anyone here know how to pronounce {T}?",
        ),
        two_term=(
            "Between {T} and {U}, which one would you pick?",
            "Neither {T} nor {U} was on the original agenda.",
            "{T} and {U} are both on the reading list.",
            "We ran out of time after {T}, so {U} will have to wait.",
            "I asked about {T}, but the answer was about {U}.",
            "The handout explains {T} on one side and {U} on the other.",
        ),
        no_term=(
            "I am not sure everyone can hear me at the back.",
            "The weather has been terrible all week, has it not?",
            "Does anybody want a coffee before we carry on?",
            "The projector needs a minute to warm up, sorry.",
            "Let me pour myself a glass of water first.",
            "I hope the traffic was not too bad this morning.",
            "We will start again in five minutes, so stretch your legs.",
            "Could the people at the back please turn the lights down?",
            "I forgot my glasses, so bear with me while I read this.",
            "Let us all agree to finish on time today.",
        ),
        openers=("Now then.", "Okay, listen.", "Good morning, everyone.", "Here we go."),
        closers=("More on that later.", "We will see.", "That is the idea.", "Keep that in mind."),
    ),
    "test": Carriers(
        one_term=(
            "{T}, that is what she said, I am fairly sure.",
            "The question from the audience was about {T}.",
            "I keep mixing up {T} with something else.",
            "The documentary spent an hour on {T}.",
            "That reminds me of {T}, which we discussed earlier.",
            "{T} came up again in the last round of questions.",
            "I found an old magazine with a story on {T}.",
            "The driver kept talking about {T} the whole way.",
            "A student emailed me a question about {T} last night.",
            "We will finish the morning with {T}.",
            "Nobody expected {T} to be on the list.",
            "The poster on the wall says {T} in big letters.",
            "It is hard to describe {T} without a drawing.",
            "My neighbour told me a long story about {T}.",
        ),
        two_term=(
            "I always forget whether it was {T} or {U}.",
            "We skipped {T} and went directly to {U}.",
            "{T} was mentioned first, then {U}.",
            "The panel spent more time on {T} than on {U}.",
            "I would like to hear more about {T} and less about {U}.",
            "Our notes from today cover {T}, and also {U}.",
        ),
        no_term=(
            "Could someone in the front row pass these papers back?",
            "The link will be in the chat in a moment.",
            "There are some snacks at the back of the room.",
            "The heating seems to be broken again, I am afraid.",
            "Please write your name on the sheet going round.",
            "I will leave a few minutes at the end for discussion.",
            "Somebody left an umbrella by the door.",
            "We have a fire drill at noon, so do not worry about the alarm.",
            "My laptop has just decided to restart itself.",
            "Thanks for waiting, the other group is almost done.",
        ),
        openers=("Yes, exactly.", "Fine, let us continue.", "Oh, I see.", "Great, thanks."),
        closers=("Just so you know.", "So there you have it.", "Let us leave it there.",
                 "Fair enough."),
    ),
    "heldout": Carriers(
        one_term=(
            "Apparently {T} was trending all weekend.",
            "The caption under the picture said {T}.",
            "My grandmother asked me what {T} is.",
            "We need a good translation for {T} before Friday.",
            "{T} is what everyone was whispering about.",
            "I saw a poster advertising {T} near the bus stop.",
            "The tour guide pointed at the map and said {T}.",
            "She underlined {T} twice in her notebook.",
            "There is a whole podcast episode about {T}.",
            "During dinner my cousin brought up {T}.",
            "The teacher wrote {T} in capital letters.",
            "We were told to look up {T} before the workshop.",
            "His email had just one thing in the subject line, {T}.",
            "Can you believe {T} was in the crossword today?",
        ),
        two_term=(
            "It started with {T} and somehow ended with {U}.",
            "The word list has {T}, but it is missing {U}.",
            "{T} sounds a bit like {U}, at least to me.",
            "The guide talked about {T} and then about {U}.",
            "He typed {T} into the search box, then {U}.",
            "On the whiteboard someone had written {T} next to {U}.",
        ),
        no_term=(
            "Sorry, I lost my train of thought for a second.",
            "Please make sure your phones are on silent.",
            "Maybe we should open the window, it is quite warm in here.",
            "The lift is out of order, so please use the stairs.",
            "I brought some extra copies in case anyone needs one.",
            "Let us give the latecomers a moment to sit down.",
            "If anyone feels cold, there are blankets by the window.",
            "The coffee machine on this floor is finally working.",
            "I promise this is the last slide before lunch.",
            "Please speak up if you cannot follow what I am saying.",
        ),
        openers=("Sure, why not.", "Hello again.", "So, where to begin.", "Okay, one moment."),
        closers=("I hope that is clear.", "That is about it.", "Think about that.",
                 "Enough on that."),
    ),
}
# Hesitations go anywhere, in every split and in term and no-term stretches alike, so they tell
# neither the split nor the presence of a term.
FILLERS = ("um", "uh", "you know", "I mean", "basically", "actually", "sort of", "kind of",
           "well", "like")

_SLOT = re.compile(r"\{([TU])\}")
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")
_VOWELS = re.compile(r"[aeiouy]+")


def word_label(token: str) -> str:
    """A written token as an aligner would label it: lowercase, edge punctuation stripped."""
    return _EDGE_PUNCT.sub("", token).lower()


@dataclass(frozen=True)
class SegmentText:
    text: str
    labels: tuple[str, ...]                     # one per whitespace token of `text`
    spans: tuple[tuple[int, int, str], ...]     # (first word, end word exclusive, main term key)
    templates: tuple[str, ...] = ()             # the sentences it was built from, in order


def term_ngrams(labels: tuple[str, ...] | list[str], lexicon: dict[str, str], max_n: int = 5):
    """Every word n-gram (1..max_n) that is a term or alias: (start, end exclusive, main key)."""
    return ngram_matches(list(labels), lexicon, max_n)


def holds_exactly(seg: SegmentText, lexicon: dict[str, str]) -> bool:
    """True when the only glossary matches are the planned spans and n-grams nested inside them.

    Then leftmost-longest and global-longest-first matching both find exactly the planned terms.
    """
    planned = {(a, b): key for a, b, key in seg.spans}
    for a, b, key in term_ngrams(seg.labels, lexicon):
        if (a, b) in planned:
            if planned[(a, b)] != key:
                return False
            continue
        if not any(pa <= a and b <= pb for pa, pb in planned):
            return False
    return all(lexicon.get(" ".join(seg.labels[a:b])) == key for a, b, key in seg.spans)


def estimate_seconds(text: str, rate_wpm: int) -> float:
    """Rough speech length for eSpeak at `rate_wpm`, from vowel groups and punctuation pauses.

    Coefficients fitted on 400 synthesised demo sentences (residual about 8%).
    """
    syllables = sum(max(1, len(_VOWELS.findall(w.lower()))) for w in text.split())
    ends = sum(text.count(c) for c in ".?!")
    return 0.45 * syllables * 60.0 / rate_wpm + 0.26 * text.count(",") + 0.47 * ends


def _units(sentence: str, fills: dict[str, tuple[str, str]]) -> list[tuple[list[str], str | None]]:
    """Split a template into units: a filled slot (term words, key) or a single word."""
    units: list[tuple[list[str], str | None]] = []
    for token in sentence.split():
        m = _SLOT.search(token)
        if m is None:
            units.append(([token], None))
            continue
        spoken, key = fills[m.group(1)]
        words = spoken.split()
        words[0] = token[:m.start()] + words[0]
        words[-1] = words[-1] + token[m.end():]
        units.append((words, key))
    return units


def _with_fillers(units, rng: np.random.Generator, n: int):
    for _ in range(n):
        pos = int(rng.integers(1, len(units))) if len(units) > 1 else 0
        prev = units[pos - 1][0][-1] if pos > 0 else ""
        if prev[-1:] in ".?!":
            continue   # a filler right after a sentence end reads oddly; skip it
        words = str(rng.choice(FILLERS)).split()
        if rng.random() < 0.5:
            words[-1] += ","
        units = units[:pos] + [(words, None)] + units[pos:]
    return units


def compose(rng: np.random.Generator, terms: list[tuple[str, str]], rate_wpm: int,
            band: tuple[float, float], carriers: Carriers) -> SegmentText:
    """One candidate transcript holding `terms` ((spoken form, main key), 0 to 2 of them), made
    only of `carriers` (one split's sentences) and the shared fillers.

    Adds openers, closers and term-free sentences until the estimated length reaches the band.
    The caller checks the result with `holds_exactly` and the synthesised length.
    """
    if len(terms) == 0:
        picked = [str(rng.choice(carriers.no_term))]
    elif len(terms) == 1:
        picked = [str(rng.choice(carriers.one_term))]
    elif rng.random() < 0.6:
        picked = [str(rng.choice(carriers.two_term))]
    else:
        picked = [str(s) for s in rng.choice(carriers.one_term, size=2, replace=False)]
    if rng.random() < 0.3:
        picked.insert(0, str(rng.choice(carriers.openers)))
    if rng.random() < 0.2:
        picked.append(str(rng.choice(carriers.closers)))
    lo = band[0]
    pool = carriers.no_term + carriers.closers
    for _ in range(6):
        if estimate_seconds(" ".join(picked), rate_wpm) >= lo:
            break
        picked.append(str(rng.choice(pool)))
    # two one-term templates: the second one's slot takes the second term
    slots = iter("TU")
    sentences = [s.replace("{T}", "{%s}" % next(slots)) if "{T}" in s and "{U}" not in s else s
                 for s in picked]
    fills = dict(zip("TU", terms))
    units = _units(" ".join(sentences), fills)
    n_fillers = int(rng.choice([0, 1, 1, 2]))
    units = _with_fillers(units, rng, n_fillers)
    words: list[str] = []
    spans = []
    for unit_words, key in units:
        if key is not None:
            spans.append((len(words), len(words) + len(unit_words), key))
        words.extend(unit_words)
    if not spans or spans[0][0] > 0:
        words[0] = words[0][:1].upper() + words[0][1:]
    text = " ".join(words)
    return SegmentText(text, tuple(word_label(w) for w in words), tuple(spans), tuple(picked))
