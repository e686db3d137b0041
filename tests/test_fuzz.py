"""Fuzzing every reader of users' files: generated and mutated manifests (JSONL and the seed's JSON),
glossaries (dict JSON, list JSON, text), alias maps, TextGrids, segment TSVs and config TOML.

The property, for each: a result whose counts add up (every record kept or rejected with a reason,
and what was kept is well formed), or a BadInput naming the file; never another exception. A reader
refusing everything would keep that property, so each reader must also accept a share of its
generated inputs, and a fixed set of valid files, reading from them what they hold.

Runs are deterministic (`derandomize`), so `make test` is the same every time; to search further,
`FUZZ_EXAMPLES=5000 FUZZ_SEED=random pytest tests/test_fuzz.py` (examples per reader; any seed).
"""
import json
import math
import os
import random
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import Config, load_config
from shared.errors import BadInput, RejectLog
from shared.glossary import load_glossary, normalize, read_alt2main
from shared.manifest import read_chunks, read_segments, write_chunks
from stage1_extract.prepare import read_words
from tests.test_prepare import textgrid

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("FUZZ_SEED", "") != "random",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# A scratch folder shared by the examples of one test (hypothesis reruns the body many times; a
# pytest tmp_path per example would be thousands of folders).
WORK = Path(tempfile.mkdtemp(prefix="fuzz-"))
WAV = WORK / "a.wav"
sf.write(WAV, np.zeros(16000 * 3, dtype=np.float32), 16000, subtype="PCM_16")

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", " ", "2", "1e9", "NaN", "true", "kubernetes", "a.wav", "-1", "é漢字", "a\u2028b\x1cc\x85"]))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
names = st.text(alphabet=string.ascii_letters + string.digits + " _-.,'éü漢\t", max_size=16)


def bad_input_names_the_file(err: BadInput, path: Path) -> None:
    assert (err.file is not None and Path(err.file).name == path.name) or str(path) in str(err), \
        f"BadInput without the file: {err}"
    assert str(err).strip()


# How the generated inputs of the reader being fuzzed fared: a reader that refused everything would
# pass every property, so each test also asserts a share of its inputs was accepted.
TALLY = {"accepted": 0, "refused": 0}


def read_or_refused(reader, path: Path, text: str):
    """reader(path) once `text` is written there; None when it refuses with a BadInput naming the file."""
    path.write_text(text, encoding="utf-8")
    try:
        out = reader(path)
    except BadInput as e:
        bad_input_names_the_file(e, path)
        TALLY["refused"] += 1
        return None
    TALLY["accepted"] += 1
    return out


def accepted_share(fuzz) -> float:
    """Run a hypothesis-decorated fuzz body over its generated inputs; the share the reader accepted."""
    TALLY.update(accepted=0, refused=0)
    fuzz()
    return TALLY["accepted"] / max(1, TALLY["accepted"] + TALLY["refused"])


# -------------------------------------------------------------------------------------------- manifests

GLOSSARY_TERMS = ["kubernetes", "new york", "paracetamol"]


def _glossary():
    p = WORK / "gloss.json"
    p.write_text(json.dumps({t: {"term": t.title()} for t in GLOSSARY_TERMS}))
    return load_glossary(p, log=None)


GLOSS = _glossary()


def good_record(i: int, seed_format: bool) -> dict:
    if seed_format:
        return {"utter_id": f"u{i}", "term_chunk_audio": str(WAV), "term_chunk_text": f"say kubernetes {i}",
                "term_chunk_audio_ground_truth_terms": ["Kubernetes"], "is_no_term_chunk": False}
    no_term = i % 3 == 2
    return {"id": f"c{i}", "audio": "a.wav", "audio_offset": 0.5 * (i % 3), "audio_duration": 1.5,
            "term_chunk_text": f"about new york {i}", "term_chunk_audio_ground_truth_terms": [] if no_term else ["new york"],
            "is_no_term_chunk": no_term, "segment_id": f"s{i}", "speaker": "spk", "split": "train",
            "term_start_time": 0.2, "term_end_time": 0.9, "extended_start_time": 0.0, "extended_end_time": 1.5}


FIELDS = list(good_record(0, False)) + ["utter_id", "term_chunk_audio", "pseudo_terms", "channel", "x"]


@st.composite
def manifests(draw):
    """(text of the file, number of records it holds): good records with 0-3 fields replaced by any
    JSON value or deleted, some lines cut or replaced by junk, as JSONL or the seed's JSON array."""
    seed_format = draw(st.booleans())
    records = []
    for i in range(draw(st.integers(1, 6))):
        d = good_record(i, seed_format)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(FIELDS))
            if draw(st.integers(0, 4)) == 0:
                d.pop(key, None)
            else:
                d[key] = draw(json_values)
        records.append(d)
    if draw(st.booleans()):                      # the seed's JSON array (NaN as Python writes it)
        text = json.dumps(records)
        if draw(st.integers(0, 5)) == 0:
            text = text[:draw(st.integers(0, len(text)))]
        return text, len(records)
    lines = [json.dumps(d) for d in records]
    for _ in range(draw(st.integers(0, 2))):
        j = draw(st.integers(0, len(lines) - 1))
        lines[j] = draw(st.sampled_from([lines[j][:len(lines[j]) // 2], "[1, 2]", '"x"', "{}", "null",
                                         lines[j] + "}", draw(st.text(max_size=20)).replace("\n", " ") or "x"]))
    text = "\n".join(lines) + "\n"
    # records are split at newlines (\n, \r\n or a lone \r, as Python reads text), not at U+2028 & co
    return text, sum(1 for x in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if x.strip())


@FUZZ
@given(manifests(), st.booleans())
def fuzz_manifest_reader(manifest, with_glossary):
    text, n_records = manifest
    try:                                           # a file that parses as a JSON array is one (the seed's)
        whole = json.loads(text)
        n_records = len(whole) if isinstance(whole, list) and text.lstrip().startswith("[") else n_records
    except ValueError:
        pass
    if not text.strip():
        n_records = 0
    path = WORK / "m.jsonl"
    path.write_text(text, encoding="utf-8")
    gloss = GLOSS if with_glossary else None
    rejects = RejectLog(None)
    try:
        kept = read_chunks(path, gloss, skip_bad=True, rejects=rejects)
    except BadInput as e:                           # a file-level problem: not JSON at all, or nothing left
        bad_input_names_the_file(e, path)
        TALLY["refused"] += 1
        return
    TALLY["accepted"] += 1
    TALLY["records"] = TALLY.get("records", 0) + n_records
    TALLY["kept"] = TALLY.get("kept", 0) + len(kept)
    assert len(kept) + len(rejects) == n_records    # every record kept or rejected with its reason
    assert all(r["reason"] and r["file"] == str(path) for r in rejects.items)
    assert len({c.id for c in kept}) == len(kept)
    for c in kept:                                  # what was kept is well formed
        assert isinstance(c.audio, str) and c.audio and math.isfinite(c.audio_offset) and c.audio_offset >= 0
        assert c.audio_duration is None or 0 < c.audio_duration <= 600
        assert all(isinstance(t, str) and t for t in c.terms)
        assert c.is_no_term_chunk in (True, False) and (c.is_no_term_chunk != bool(c.terms or c.pseudo_terms))
        if gloss is not None:
            assert all(t in gloss.entries for t in c.terms)
    # a kept record survives a write and a read unchanged
    write_chunks(kept, WORK / "m2.jsonl")
    assert read_chunks(WORK / "m2.jsonl", gloss) == kept
    # without --skip-bad: the same records, or the first bad one named
    try:
        assert read_chunks(path, gloss) == kept and not rejects.items
    except BadInput as e:
        assert rejects.items and e.record == rejects.items[0]["record"]
        bad_input_names_the_file(e, path)


def test_manifest_reader():
    TALLY.update(records=0, kept=0)
    # mutated files still mostly parse, and most of their records are good ones (0-3 fields changed)
    assert accepted_share(fuzz_manifest_reader) > 0.5
    assert TALLY["kept"] > 0.3 * TALLY["records"], TALLY


# ------------------------------------------------------------------------------ glossaries, alias maps

entry_values = st.fixed_dictionaries({}, optional={
    "term": json_values | names, "short_description": json_values | names,
    "target_translations": json_values | st.dictionaries(st.sampled_from(["de", "zh", "ja"]), names, max_size=3)})


@st.composite
def glossaries(draw):
    kind = draw(st.sampled_from(["dict", "list", "text"]))
    if kind == "dict":
        data = draw(st.dictionaries(names, entry_values | json_values, max_size=6))
        return "g.json", json.dumps(data)
    if kind == "list":
        data = draw(st.lists(names | entry_values | json_values, max_size=6))
        return "g.json", json.dumps(data)
    lines = draw(st.lists(names | st.sampled_from(["# comment", "", "   ", "Kubernetes", "kubernetes!"]), max_size=8))
    return "g.txt", "\n".join(lines)


@FUZZ
@given(glossaries())
def fuzz_glossary_reader(glossary):
    name, text = glossary
    g = read_or_refused(lambda p: load_glossary(p, log=None), WORK / name, text)
    if g is None:
        return
    assert len(g) == len(g.keys) >= 1 and g.keys == sorted(set(g.keys))
    for i, key in enumerate(g.keys):
        assert key == normalize(key) and key
        assert g.id(key) == i and g.canonical(key) == key
        entry = g.entries[key]
        assert isinstance(entry["term"], str) and normalize(entry["term"]) == key
        assert all(isinstance(t, str) for f in ("term", "short_description") for t in g.texts(f))
        tr = entry.get("target_translations", {})
        assert isinstance(tr, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tr.items())
        assert isinstance(entry.get("short_description", ""), str)


# alias maps from a few forms that chain (kube -> k8s -> kubernetes), cycle, clash or are empty, as well as
# anything: random text alone is almost never a valid map
ALIAS_WORDS = ["k8s", "kube", "K8S", "ps5", "nyc", "", " ", "Kubernetes", "kubernetes", "PlayStation", "New York"]
alias_maps = st.dictionaries(st.sampled_from(ALIAS_WORDS), st.sampled_from(ALIAS_WORDS), max_size=4)


@FUZZ
@given(alias_maps | st.dictionaries(names, names | json_values, max_size=6) | json_values)
def fuzz_alias_map_reader(data):
    aliases = read_or_refused(read_alt2main, WORK / "alt2main.json", json.dumps(data))
    if aliases is None:
        return
    assert isinstance(data, dict)
    for alias, main in aliases.items():
        assert alias and main and alias == normalize(alias) and main == normalize(main)
        assert main not in aliases and alias != main          # chains followed to their main term


# -------------------------------------------------------------------------------------------- TextGrids

times = st.floats(-1, 20, allow_nan=False) | st.sampled_from([float("nan"), float("inf"), 0.0, 1e9])


@st.composite
def textgrids(draw):
    """A TextGrid as MFA writes it, then its times, labels, tier name or bytes changed."""
    n = draw(st.integers(0, 5))
    words, t = [], 0.0
    for _ in range(n):
        a = t + draw(st.floats(0, 0.5))
        b = a + draw(st.floats(0.01, 1.0))
        words.append((round(a, 3), round(b, 3), draw(names.filter(lambda s: '"' not in s))))
        t = b
    text = textgrid(words, round(t + 1, 3), tier=draw(st.sampled_from(["words", "Words", "phones", ""])))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.integers(0, 3))
        lines = text.split("\n")
        j = draw(st.integers(0, len(lines) - 1))
        if how == 0 and "=" in lines[j]:            # a value replaced
            key = lines[j].split("=")[0]
            lines[j] = f"{key}= {draw(times | st.text(max_size=6).map(json.dumps))}"
        elif how == 1:                              # a line dropped
            del lines[j]
        elif how == 2:                              # cut short
            lines = lines[:j]
        else:                                       # junk
            lines.insert(j, draw(st.text(max_size=20)))
        text = "\n".join(lines)
    return text


@FUZZ
@given(textgrids())
def fuzz_textgrid_reader(text):
    words = read_or_refused(read_words, WORK / "seg.TextGrid", text)
    if words is None:
        return
    prev = 0.0
    for w in words:
        assert math.isfinite(w.start) and math.isfinite(w.end) and 0 <= w.start <= w.end
        assert w.start >= prev - 1e-6 and w.text.strip()
        prev = w.end


# ---------------------------------------------------------------------------------------- segment TSVs

cells = names | st.sampled_from(["a.wav", "a.wav:0:16000", "a.wav:-5:10", "a.wav:16000:0", "missing.wav",
                                  "a.wav:99999999999:1", "", "id", "en"])


@FUZZ
@given(st.booleans(), st.lists(st.lists(cells, min_size=0, max_size=7), max_size=6))
def fuzz_segments_reader(header, rows):
    lines = (["id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang"] if header else []) + ["\t".join(r) for r in rows]
    segs = read_or_refused(read_segments, WORK / "segments.tsv", "\n".join(lines) + "\n")
    if segs is None:
        return
    assert len({s.id for s in segs}) == len(segs) == sum(1 for r in rows if "\t".join(r).strip()) - (
        0 if header or not rows or not rows[0] or rows[0][0] != "id" else 1)
    for s in segs:
        assert s.id and Path(s.audio).is_absolute() and s.offset >= 0 and (s.num_samples > 0 or s.num_samples == -1)


# ------------------------------------------------------------------------------------------ config TOML

def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


DEFAULTS = {f"{s}.{k}": v for s, sec in Config().to_dict().items() for k, v in sec.items()}
CONFIG_KEYS = list(DEFAULTS) + ["train.nope", "nope.x", "x"]
toml_values = (st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=8) | st.lists(st.integers(0, 3) | st.text(max_size=3), max_size=3))
# a key with its default (a valid value of the right type) 3 times in 4, with anything otherwise
key_values = st.tuples(st.sampled_from(CONFIG_KEYS), st.integers(0, 3)).flatmap(
    lambda kr: st.tuples(st.just(kr[0]), st.just(DEFAULTS[kr[0]]) if kr[0] in DEFAULTS and kr[1] else toml_values))


@FUZZ
@given(st.lists(key_values, max_size=5, unique_by=lambda kv: kv[0]).map(dict), st.booleans())
def fuzz_config_reader(values, junk):
    by_section: dict[str, dict] = {}
    for key, v in values.items():
        sec, _, name = key.rpartition(".")
        by_section.setdefault(sec, {})[name] = v
    text = "\n".join((f"[{sec}]\n" if sec else "") + "\n".join(f"{k} = {_toml(v)}" for k, v in kv.items())
                     for sec, kv in sorted(by_section.items()))
    if junk:
        text = text[:random.Random(len(text)).randint(0, len(text))] + "\n= ]"
    cfg = read_or_refused(load_config, WORK / "c.toml", text)
    if cfg is None:
        return
    for sec, kv in cfg.to_dict().items():               # every number it kept is finite
        for k, v in kv.items():
            assert not isinstance(v, float) or math.isfinite(v), f"{sec}.{k} = {v}"
    assert cfg.train.batch_size >= 1 and cfg.train.epochs >= 1 and cfg.train.lr > 0


@pytest.mark.parametrize("name, fuzz, least", [
    ("glossary", fuzz_glossary_reader, 0.1), ("alias map", fuzz_alias_map_reader, 0.1),
    ("TextGrid", fuzz_textgrid_reader, 0.1), ("segments", fuzz_segments_reader, 0.05),
    ("config", fuzz_config_reader, 0.1)])
def test_reader_properties_hold_on_generated_inputs_and_many_are_accepted(name, fuzz, least):
    share = accepted_share(fuzz)
    assert share >= least, f"{name}: only {share:.1%} of the generated inputs accepted"


# Valid files each reader must accept, with what it must read from them: a reader refusing (or
# dropping) good input fails here, where the properties above would still hold.
def _valid_manifest(path):
    recs = [good_record(i, False) for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rejects = RejectLog(None)
    kept = read_chunks(path, GLOSS, skip_bad=True, rejects=rejects)
    assert [c.id for c in kept] == ["c0", "c1", "c2"] and not rejects.items
    assert [c.terms for c in kept] == [["new york"], ["new york"], []] and kept[2].is_no_term_chunk
    assert kept[1].audio_offset == 0.5 and kept[1].audio_duration == 1.5 and Path(kept[0].audio) == WAV


def _valid_seed_manifest(path):
    path.write_text(json.dumps([good_record(i, True) for i in range(2)]))
    kept = read_chunks(path, GLOSS)
    assert [c.terms for c in kept] == [["kubernetes"], ["kubernetes"]]
    assert [c.term_chunk_text for c in kept] == ["say kubernetes 0", "say kubernetes 1"]


def _valid_glossaries(path):
    for name, text in [("g.json", json.dumps({"Kubernetes": {"term": "Kubernetes", "target_translations": {"de": "K"}},
                                              "new york": {"term": "New York"}})),
                       ("g.json", json.dumps(["Kubernetes", {"term": "New York"}])),
                       ("g.txt", "# terms\nKubernetes\n\nNew York\n")]:
        (path.parent / name).write_text(text)
        g = load_glossary(path.parent / name, log=None)
        assert g.keys == ["kubernetes", "new york"] and g.entries["new york"]["term"] == "New York"


def _valid_alias_map(path):
    path.write_text(json.dumps({"K8s": "Kubernetes", "kube": "k8s", "NYC": "New York"}))
    assert read_alt2main(path) == {"k8s": "kubernetes", "kube": "kubernetes", "nyc": "new york"}


def _valid_textgrid(path):
    path.write_text(textgrid([(0.1, 0.5, "hello"), (0.6, 1.2, "New York")], 1.5))
    words = read_words(path)
    assert [(w.start, w.end, w.text) for w in words] == [(0.1, 0.5, "hello"), (0.6, 1.2, "New York")]


def _valid_segments(path):
    rows = ["s1\ta.wav\t16000\tspk\thello\ten", "s2\ta.wav:16000:8000\t8000\tspk\tworld\ten"]
    for header in ([], ["id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang"]):
        path.write_text("\n".join(header + rows) + "\n")
        segs = read_segments(path)
        assert [(s.id, Path(s.audio), s.offset, s.num_samples) for s in segs] == \
            [("s1", WAV, 0, -1), ("s2", WAV, 16000, 8000)]


def _valid_config(path):
    path.write_text('[train]\nbatch_size = 8\nlr = 0.01\n[eval]\nglossary_sizes = [100, 1000]\n')
    cfg = load_config(path)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.eval.glossary_sizes) == (8, 0.01, [100, 1000])
    assert cfg.train.epochs == Config().train.epochs                 # the rest keeps its defaults


@pytest.mark.parametrize("check, name", [(_valid_manifest, "m.jsonl"), (_valid_seed_manifest, "m.json"),
                                         (_valid_glossaries, "g.json"), (_valid_alias_map, "a.json"),
                                         (_valid_textgrid, "v.TextGrid"), (_valid_segments, "s.tsv"),
                                         (_valid_config, "c.toml")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_valid_files_are_read_whole(check, name):
    check(WORK / name)               # in WORK: the manifests' relative "a.wav" is WORK's


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nfuzz: {EXAMPLES} generated inputs per reader x 6 readers")


def test_a_chunk_text_with_unicode_line_separators_reads_back_as_one_record(tmp_path):
    """write_chunks leaves U+2028, \x1c, \x85 unescaped (ensure_ascii=False); the reader splits at newlines only."""
    rec = good_record(0, False) | {"audio": str(WAV), "term_chunk_text": "new york\u2028city\x1chall\x85"}
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    (c,) = read_chunks(tmp_path / "m.jsonl")
    write_chunks([c], tmp_path / "m2.jsonl")
    assert "\u2028" in (tmp_path / "m2.jsonl").read_text() and read_chunks(tmp_path / "m2.jsonl") == [c]


# What the fuzzer found, kept as plain cases: each crashed a reader or was let through before.
FOUND = [
    ("g.json", '{"k": {"term": [null]}}', load_glossary, "field 'term' is [None], not a string"),
    ("g.json", '{"k": {"term": "K", "target_translations": ["Ka"]}}', load_glossary, "target_translations is"),
    ("a.json", '{"x": ""}', read_alt2main, "an empty alias or main term"),
    ("s.tsv", "\ta.wav\t1\tspk\thello\ten\n", read_segments, "empty id"),
    ("s.tsv", "s1\t\t1\tspk\thello\ten\n", read_segments, "empty audio"),
    ("s.tsv", "s1\ta.wav:0:0\t1\tspk\thello\ten\n", read_segments, "spans 0 samples"),
    ("c.toml", "[eval]\nkeep_hits = inf\n", load_config, "config key 'eval.keep_hits' is inf"),
    ("c.toml", "[train]\nlr = 0.0\n", load_config, "must be above 0"),
    ("c.toml", "[data]\ndev_ratio = 1.5\n", load_config, "a fraction, at most 1"),
    ("c.toml", "[train]\nbatch_size = -2\n", load_config, "must be above 0"),
]


@pytest.mark.parametrize("name, text, reader, message", FOUND, ids=[f[3][:30] for f in FOUND])
def test_what_the_fuzzer_found(tmp_path, name, text, reader, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadInput, match=message.replace("[", "\\[").replace("]", "\\]")) as e:
        reader(path)
    assert str(path) in str(e.value)


def test_a_null_description_is_an_absent_one(tmp_path):
    (tmp_path / "g.json").write_text('{"k": {"term": "K", "short_description": null}}')
    g = load_glossary(tmp_path / "g.json", log=None)
    assert g.entries["k"] == {"term": "K"} and g.text(0, "short_description") == "K"
