"""lhotse in and out: a CutSet built here (synthetic WAVs, word alignments as AlignmentItems) gives the
same manifests as the segments TSV + TextGrids for the same audio and words; chunks -> CutSet -> chunks."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

lhotse = pytest.importorskip("lhotse")
from lhotse import (AudioSource, CutSet, MonoCut, MultiCut, Recording, RecordingSet, SupervisionSegment,  # noqa: E402
                    SupervisionSet)
from lhotse.supervision import AlignmentItem  # noqa: E402

from shared.audio import read_audio  # noqa: E402
from shared.errors import BadInput  # noqa: E402
from shared.manifest import read_chunks  # noqa: E402
from stage1_extract.lhotse_io import cuts_to_chunks, export_cuts, prepare_lhotse  # noqa: E402
from stage1_extract.prepare import prepare  # noqa: E402
from tests.test_prepare import GLOSSARY, textgrid  # noqa: E402

SR = 16000
# segment-relative word times, silences included (both inputs drop them the same way)
S1 = [(0.0, 0.6, "Kubernetes"), (0.6, 0.7, "sil"), (0.7, 1.0, "is"), (1.0, 1.4, "great"),
      (1.5, 1.8, "and"), (1.8, 2.2, "we"), (2.2, 2.6, "like"), (2.6, 2.9, "it"), (3.0, 3.3, "a"),
      (3.3, 3.8, "lot"), (3.8, 4.2, "so"), (4.2, 4.6, "much"), (4.6, 4.9, "<eps>"), (5.0, 5.4, "then"),
      (5.4, 5.8, "visit"), (5.8, 6.1, "sp"), (6.1, 6.5, "new"), (6.5, 6.9, "york"), (6.9, 7.3, "city"),
      (7.3, 7.7, "hall"), (7.7, 8.3, "today"), (8.3, 9.4, "with"), (9.4, 10.0, "acetaminophen")]
S3 = [(0.2, 0.6, "machine"), (0.6, 1.0, "learning"), (1.0, 1.5, "rocks"), (1.6, 2.0, "kubernetes")]
S4 = [(0.1, 0.5, "we"), (0.5, 1.0, "like"), (1.0, 1.6, "machine"), (1.6, 2.1, "learning"),
      (2.2, 2.6, "and"), (2.6, 3.2, "paracetamol"), (3.3, 3.9, "today")]
S5 = [(0.3, 0.9, "new"), (0.9, 1.4, "york"), (1.4, 2.0, "is"), (2.0, 2.5, "big"), (2.6, 3.4, "kubernetes")]


def noise(rng, seconds, sr, channels=1):
    x = (0.1 * rng.standard_normal((int(seconds * sr), channels))).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def items(words, at):
    """lhotse's word alignment: times from the start of the recording (the segment starts `at`)."""
    return [AlignmentItem(symbol=w, start=round(at + s, 6), duration=round(e - s, 6)) for s, e, w in words]


@pytest.fixture
def corpus(tmp_path):
    """The same four segments as a TSV + TextGrids and as lhotse manifests:
    s1, s3 inside a long 16 kHz mono file (cuts starting before them: cut offsets add up),
    s4 in a 44.1 kHz stereo file (supervision on both channels), s5 on channel 1 of a recording
    stored as one mono 8 kHz file per channel (AMI-style headsets)."""
    rng = np.random.default_rng(0)
    a = tmp_path / "audio"
    a.mkdir()
    sf.write(a / "long.wav", noise(rng, 30, SR), SR, subtype="PCM_16")
    sf.write(a / "stereo44.wav", noise(rng, 6, 44100, 2), 44100, subtype="PCM_16")
    sf.write(a / "head0.wav", noise(rng, 5, 8000), 8000, subtype="PCM_16")
    sf.write(a / "head1.wav", noise(rng, 5, 8000), 8000, subtype="PCM_16")
    # (id, file, start s, duration s, speaker, words)
    segs = [("s1", "long.wav", 5.0, 10.0, "spkA", S1), ("s3", "long.wav", 20.0, 2.5, "spkB", S3),
            ("s4", "stereo44.wav", 1.0, 4.0, "spkA", S4), ("s5", "head1.wav", 0.5, 4.0, "spkC", S5)]
    ali = tmp_path / "ali"
    ali.mkdir()
    rows = ["id\taudio\tn_frames\tspeaker\tsrc_text\tsrc_lang"]
    for sid, f, start, dur, spk, words in segs:
        (ali / f"{sid}.TextGrid").write_text(textgrid(words, dur))
        text = " ".join(w for _, _, w in words if w not in ("sil", "sp", "<eps>"))
        rows.append(f"{sid}\t{a / f}:{round(start * SR)}:{round(dur * SR)}\t{round(dur * SR)}\t{spk}\t{text}\ten")
    (tmp_path / "segments.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "glossary.json").write_text(json.dumps(GLOSSARY))
    (tmp_path / "alt2main.json").write_text(json.dumps({"acetaminophen": "paracetamol"}))

    long = Recording.from_file(a / "long.wav", recording_id="long")
    st = Recording.from_file(a / "stereo44.wav", recording_id="st")
    heads = Recording(id="heads", sampling_rate=8000, num_samples=5 * 8000, duration=5.0,
                      sources=[AudioSource("file", [0], str(a / "head0.wav")),
                               AudioSource("file", [1], str(a / "head1.wav"))])
    sup = {sid: SupervisionSegment(id=sid, recording_id=rid, start=start, duration=dur, channel=ch, speaker=spk,
                                   text=" ".join(w for _, _, w in words), language="en",
                                   alignment={"word": items(words, start)})
           for (sid, _, start, dur, spk, words), rid, ch in zip(segs, ["long", "long", "st", "heads"],
                                                               [0, 0, [0, 1], 1])}
    sups = SupervisionSet.from_segments(list(sup.values()))
    recs = RecordingSet.from_recordings([long, st, heads])
    sups.to_file(tmp_path / "supervisions.jsonl.gz")
    recs.to_file(tmp_path / "recordings.jsonl.gz")
    # cuts: s1 in a cut from 4 s, s3 in one from 19 s (supervision starts count from the cut's start,
    # alignments from the recording's), s4 in a MultiCut on both channels, s5 in a MonoCut on channel 1
    cuts = CutSet.from_cuts([
        MonoCut("c1", start=4.0, duration=12.0, channel=0, recording=long,
                supervisions=[sup["s1"].with_offset(-4.0)]),
        MonoCut("c3", start=19.0, duration=4.0, channel=0, recording=long,
                supervisions=[sup["s3"].with_offset(-19.0)]),
        MultiCut("c4", start=0.0, duration=6.0, channel=[0, 1], recording=st, supervisions=[sup["s4"]]),
        MonoCut("c5", start=0.0, duration=5.0, channel=1, recording=heads, supervisions=[sup["s5"]])])
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    return tmp_path


OPTIONS = dict(split_by="speaker", test_speakers=["spkB"], dev_speakers=["spkC"], noterm_ratio=1.0,
               pseudo_ratio=1.0, pseudo_term_free=False, log=lambda *_: None)


def outputs(folder: Path) -> dict:
    out = {p.name: p.read_text() for p in folder.glob("*.jsonl")}
    summary = json.loads((folder / "prepare_summary.json").read_text())
    summary.pop("seconds")
    return {**out, "summary": summary}


def test_cuts_and_manifests_give_the_tsv_paths_manifests(corpus):
    g, alt = corpus / "glossary.json", corpus / "alt2main.json"
    prepare(corpus / "segments.tsv", corpus / "ali", g, corpus / "tsv", alt2main=alt, **OPTIONS)
    prepare_lhotse(g, corpus / "cuts", cuts=corpus / "cuts.jsonl.gz", alt2main=alt, **OPTIONS)
    prepare_lhotse(g, corpus / "man", recordings=corpus / "recordings.jsonl.gz",
                   supervisions=corpus / "supervisions.jsonl.gz", alt2main=alt, **OPTIONS)
    tsv = outputs(corpus / "tsv")
    assert set(tsv) == {"train.jsonl", "dev.jsonl", "test.jsonl", "summary"}
    assert outputs(corpus / "cuts") == tsv
    assert outputs(corpus / "man") == tsv
    chunks = {c.id: c for split in ("train", "dev", "test") for c in read_chunks(corpus / "cuts" / f"{split}.jsonl")}
    assert {c.segment_id for c in chunks.values()} == {"s1", "s3", "s4", "s5"}
    assert all(c.channel is None for c in chunks.values())       # whole files: nothing to record
    # s1 lies 5 s into long.wav: a cut at 4 s + the supervision 1 s into it; its first chunk as in test_prepare
    assert chunks["s1_t0"].audio_offset == pytest.approx(5.0) and chunks["s1_t0"].audio_duration == pytest.approx(1.6)
    assert chunks["s5_t0"].audio.endswith("head1.wav")           # channel 1 of the recording = that file
    assert chunks["s5_t0"].terms == ["new york"]
    assert any(c.pseudo_terms for c in chunks.values()) and any(c.is_no_term_chunk for c in chunks.values())


def test_one_channel_of_a_stereo_file(corpus):
    """A stereo call with one speaker per channel: the chunks read only their speaker's channel."""
    sr = 8000
    t = np.arange(4 * sr) / sr
    left = 0.3 * np.sin(2 * np.pi * 300 * t)
    right = 0.1 * np.random.default_rng(1).standard_normal(len(t))
    sf.write(corpus / "call.wav", np.stack([left, right], 1).astype(np.float32), sr, subtype="FLOAT")
    call = Recording.from_file(corpus / "call.wav", recording_id="call")
    assert call.channel_ids == [0, 1]
    words = [(0.2, 0.8, "we"), (0.8, 1.5, "use"), (1.5, 2.3, "kubernetes"), (2.3, 2.8, "daily")]
    sups = [SupervisionSegment(id=f"call-{ch}", recording_id="call", start=0.5, duration=3.0, channel=ch,
                               speaker=f"side{ch}", alignment={"word": items(words, 0.5)}) for ch in (0, 1)]
    cuts = CutSet.from_cuts([MonoCut(f"call-{ch}", start=0.0, duration=4.0, channel=ch, recording=call,
                                     supervisions=[sups[ch]]) for ch in (0, 1)])
    cuts.to_file(corpus / "call.jsonl.gz")
    prepare_lhotse(corpus / "glossary.json", corpus / "call", cuts=corpus / "call.jsonl.gz", noterm_ratio=0.0,
                   log=lambda *_: None)
    got = {c.id: c for c in read_chunks(corpus / "call" / "chunks.jsonl")}
    assert set(got) == {"call-0_t0", "call-1_t0"}
    for ch in (0, 1):
        c = got[f"call-{ch}_t0"]
        assert c.channel == [ch] and c.terms == ["kubernetes"] and c.audio == str(corpus / "call.wav")
        assert json.loads(c.to_json())["channel"] == [ch]
        wav = read_audio(c.audio, c.audio_offset, c.audio_duration, channels=c.channel)
        mixed = read_audio(c.audio, c.audio_offset, c.audio_duration)
        side = read_audio(corpus / "call.wav", c.audio_offset, c.audio_duration, channels=[1 - ch])
        assert np.allclose(wav + side, 2 * mixed, atol=1e-4)   # this side alone, not the mix
        assert not np.allclose(wav, mixed, atol=1e-2)
    with pytest.raises(BadInput, match="channels \\[2\\] asked of a file with 2"):
        read_audio(corpus / "call.wav", 0.0, 1.0, channels=[2])


def test_bad_lhotse_input_is_named_and_skippable(corpus):
    long = Recording.from_file(corpus / "audio" / "long.wav", recording_id="long")
    ok = SupervisionSegment("ok", "long", 20.0, 2.5, alignment={"word": items(S3, 20.0)})
    bad = {
        "no word alignment": SupervisionSegment("noali", "long", 5.0, 2.0),
        "count from the start of the recording": SupervisionSegment(   # times relative to the supervision
            "rel", "long", 10.0, 2.5, alignment={"word": items(S3, 0.0)}),
        "overlapping words": SupervisionSegment(
            "ovl", "long", 1.0, 2.0, alignment={"word": [AlignmentItem("a", 1.1, 0.5), AlignmentItem("b", 1.3, 0.5)]}),
        "past the segment's audio": SupervisionSegment(
            "long_word", "long", 1.0, 2.0, alignment={"word": items([(0.1, 2.5, "hello")], 1.0)}),
        "which recording long lacks": SupervisionSegment(
            "chan", "long", 1.0, 2.0, channel=3, alignment={"word": items(S3, 1.0)}),
    }
    out = corpus / "bad"
    for reason, sup in bad.items():
        path = corpus / f"{sup.id}.jsonl.gz"
        CutSet.from_cuts([MonoCut("c", 0.0, 30.0, 0, recording=long, supervisions=[sup, ok])]).to_file(path)
        with pytest.raises(BadInput, match=reason) as e:
            prepare_lhotse(corpus / "glossary.json", out, cuts=path, log=lambda *_: None)
        assert str(path) in str(e.value) and f"supervision {sup.id}" in str(e.value)
    s = prepare_lhotse(corpus / "glossary.json", out, cuts=path, skip_bad=True, log=lambda *_: None)
    assert s["segments_read"] == 2 and s["rejected"] == 1
    assert json.loads((out / "rejected.jsonl").read_text())["segment_id"] == "chan"
    # a speed-perturbed recording: the file is not what the cut plays
    fast = CutSet.from_cuts([MonoCut("c", 0.0, 30.0, 0, recording=long, supervisions=[ok])]).perturb_speed(1.1)
    fast.to_file(corpus / "fast.jsonl.gz")
    with pytest.raises(BadInput, match="audio transforms \\['Speed'\\]"):
        prepare_lhotse(corpus / "glossary.json", out, cuts=corpus / "fast.jsonl.gz", log=lambda *_: None)
    with pytest.raises(BadInput, match="not a lhotse CutSet"):
        prepare_lhotse(corpus / "glossary.json", out, cuts=corpus / "supervisions.jsonl.gz", log=lambda *_: None)
    with pytest.raises(BadInput, match="go together"):
        prepare_lhotse(corpus / "glossary.json", out, recordings=corpus / "recordings.jsonl.gz", log=lambda *_: None)


def test_export_cuts_round_trip(corpus):
    """prepare -> export-cuts -> lhotse reads the cuts: same audio, text, terms; and back to the same chunks."""
    prepare(corpus / "segments.tsv", corpus / "ali", corpus / "glossary.json", corpus / "chunks",
            alt2main=corpus / "alt2main.json", **OPTIONS)
    train = read_chunks(corpus / "chunks" / "train.jsonl")
    # and a chunk of one channel of a stereo file
    sf.write(corpus / "call.wav", noise(np.random.default_rng(2), 3, 8000, 2), 8000, subtype="PCM_16")
    side = dataclasses.replace(train[0], id="call_t0", audio=str(corpus / "call.wav"), audio_offset=0.5,
                               audio_duration=1.5, channel=[1])
    with open(corpus / "chunks" / "train.jsonl", "a") as f:
        f.write(side.to_json() + "\n")
    chunks = train + [side] + [c for s in ("dev", "test") for c in read_chunks(corpus / "chunks" / f"{s}.jsonl")]
    summary = export_cuts(corpus / "chunks", corpus / "chunks.jsonl.gz")
    assert summary["cuts"] == len(chunks) == len(set(c.id for c in chunks))

    cuts = CutSet.from_file(corpus / "chunks.jsonl.gz")
    by_id = {c.id: c for c in cuts}
    assert list(by_id) == [c.id for c in chunks]
    for c in chunks:
        cut = by_id[c.id]
        assert cut.start == pytest.approx(c.audio_offset) and cut.duration == pytest.approx(c.audio_duration)
        assert cut.recording.sources[0].source == c.audio
        (sup,) = cut.supervisions
        assert sup.text == c.term_chunk_text and sup.start == 0 and sup.duration == pytest.approx(cut.duration)
        assert cut.terms == c.terms and cut.is_no_term_chunk == c.is_no_term_chunk and cut.subset == c.split
        assert cut.custom.get("pseudo_terms", []) == c.pseudo_terms
        if c.audio.endswith("long.wav"):   # 16 kHz mono: lhotse loads exactly the samples the reader does
            assert np.allclose(cut.load_audio()[0], read_audio(c.audio, c.audio_offset, c.audio_duration), atol=1e-6)
    call = by_id["call_t0"]
    assert isinstance(call, MonoCut) and call.channel == 1
    assert np.allclose(call.load_audio()[0], sf.read(corpus / "call.wav", dtype="float32")[0][4000:16000, 1])
    assert isinstance(by_id["s4_t0"], MultiCut) and by_id["s4_t0"].channel == [0, 1]   # the whole stereo file
    assert cuts_to_chunks(corpus / "chunks.jsonl.gz") == chunks


def test_the_core_pipeline_never_imports_lhotse():
    code = ("import sys, stage1_extract.cli as c, stage2_train.train, stage3_index.cli, stage3_index.retriever;"
            "c._register(); import termret.cli; print('lhotse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_commands(corpus):
    """`prepare --cuts` and `prepare --segments` give the same files; `export-cuts` writes the CutSet."""
    from click.testing import CliRunner

    from termret.cli import cli
    common = ["--glossary", str(corpus / "glossary.json"), "--alt2main", str(corpus / "alt2main.json"),
              "--split-by", "speaker", "--test-speakers", "spkB"]
    run = CliRunner().invoke
    r = run(cli, ["prepare", "--segments", str(corpus / "segments.tsv"), "--alignments", str(corpus / "ali"),
                  "--out", str(corpus / "a"), *common])
    assert r.exit_code == 0, r.output
    r = run(cli, ["prepare", "--cuts", str(corpus / "cuts.jsonl.gz"), "--out", str(corpus / "b"), *common])
    assert r.exit_code == 0, r.output
    for name in ("train.jsonl", "test.jsonl"):
        assert (corpus / "a" / name).read_text() == (corpus / "b" / name).read_text()
    r = run(cli, ["prepare", "--cuts", str(corpus / "cuts.jsonl.gz"), "--segments", str(corpus / "segments.tsv"),
                  "--out", str(corpus / "c"), *common])
    assert isinstance(r.exception, BadInput) and "two inputs" in str(r.exception)
    r = run(cli, ["export-cuts", "--chunks", str(corpus / "b"), "--out", str(corpus / "b.jsonl.gz")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and len(CutSet.from_file(corpus / "b.jsonl.gz")) == sum(
        len(read_chunks(corpus / "b" / n)) for n in ("train.jsonl", "test.jsonl"))
