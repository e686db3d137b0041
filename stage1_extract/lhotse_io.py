"""lhotse in and out.

In: a lhotse CutSet, or a RecordingSet + SupervisionSet, whose supervisions carry word alignments
(`alignment["word"]`), becomes the same aligned segments as a segments TSV + TextGrids
(prepare.AlignedSegment, one per supervision), which prepare's one chunker cuts: same chunks.
Out: term-chunk manifests become a CutSet (one cut per chunk), for lhotse's samplers and
augmentation; `cuts_to_chunks` reads such a CutSet back.

lhotse is imported inside these functions only: it imports torch (~1.7 s), and nothing else in the
pipeline needs it.

How lhotse's descriptions map onto a chunk (an audio file, an offset and a duration in seconds,
mixed to mono and resampled to 16 kHz when read):
- Times: a supervision's start counts from its cut's start, so it lies cut.start + sup.start into
  the recording; alignment items count from the recording's start (lhotse's convention).
- Sampling rates: chunks hold seconds and the reader resamples whatever rate the file has, so any
  rate works; a Resample transform on a recording is therefore a no-op here. Other transforms
  (speed, volume, reverb) change the audio a chunk cannot describe: refused.
- Channels: a supervision's channel(s) must be stored in one file of its recording. All channels
  of that file: the chunk mixes the whole file (as for TSV input, no `channel` field). Some of them
  (one side of a stereo call): the chunk records the file's channel numbers in `channel` and the
  reader mixes only those, so the other side's speech never enters a chunk, not even a no-term one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import click
from tqdm import tqdm

from shared.audio import audio_info
from shared.cli import config_options, figures
from shared.config import Config
from shared.errors import BadInput
from shared.manifest import SAMPLE_RATE, Chunk, Segment, read_chunks
from stage1_extract.prepare import (SILENCE, _TIME_TOLERANCE, AlignedSegment, SegmentAudio, SegmentSource,
                                    Word, check_word_ends, load_glossary_arg, prepare_aligned)

LHOTSE_PIN = "lhotse==1.33.0"   # what requirements.txt installs


def _lhotse():
    try:
        import lhotse
    except ImportError:
        raise BadInput("the lhotse package is not installed", fix=f"pip install {LHOTSE_PIN} "
                       "(or pip install -e '.[lhotse]')") from None
    return lhotse


def _load(kind: str, path) -> list:
    """The items of a lhotse manifest of `kind` (CutSet, RecordingSet, SupervisionSet), read in full
    (lhotse opens .jsonl.gz lazily: a wrong file shows only while reading), with a clear error."""
    lhotse = _lhotse()
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"lhotse {kind} file does not exist", file=path, fix="check the path")
    fix = f"give the {kind} manifest lhotse wrote (e.g. *.jsonl.gz)"
    try:
        manifest = getattr(lhotse, kind).from_file(path)   # gives whatever kind the file holds
        if not isinstance(manifest, getattr(lhotse, kind)):
            raise BadInput(f"not a lhotse {kind}: the file holds a {type(manifest).__name__}", file=path, fix=fix)
        return list(manifest)
    except BadInput:
        raise
    except Exception as e:  # lhotse raises KeyError, TypeError, JSON errors... for a wrong file
        raise BadInput(f"not a lhotse {kind} ({type(e).__name__}: {e})", file=path, fix=fix) from None


def _file_and_channels(rec, sup, file, record) -> tuple[str, list[int] | None]:
    """The audio file holding `sup`'s channel(s), and which of that file's channels (None = all)."""
    names = [t.get("name") if isinstance(t, dict) else type(t).__name__ for t in (rec.transforms or [])]
    changed = [n for n in names if n != "Resample"]
    if changed:
        raise BadInput(f"recording {rec.id} has audio transforms {changed}: a chunk points at the file "
                       f"as it is", file=file, record=record,
                       fix="prepare from the recordings before perturbation (augment in training), or "
                           "write the perturbed audio to files first (lhotse: cuts.save_audios(DIR))")
    want = list(sup.channel) if isinstance(sup.channel, (list, tuple)) else [sup.channel]
    unknown = [c for c in want if c not in rec.channel_ids]
    if unknown:
        raise BadInput(f"on channel(s) {unknown}, which recording {rec.id} lacks "
                       f"(channels {rec.channel_ids})", file=file, record=record,
                       fix="fix the supervision's channel")
    sources = [s for s in rec.sources if set(s.channels) & set(want)]
    if len(sources) != 1:
        raise BadInput(f"spans channels {want}, stored in {len(sources)} files of "
                       f"recording {rec.id}: a chunk reads one file", file=file, record=record,
                       fix="give each channel its own supervision, or mix the files into one first")
    src = sources[0]
    if src.type != "file":
        raise BadInput(f"recording {rec.id}: an audio source of type {src.type!r}; prepare reads audio "
                       f"files", file=file, record=record,
                       fix="write the audio to files first (lhotse: cuts.save_audios(DIR)), or point "
                           "the recording at local files")
    # relative paths are relative to the working directory, as lhotse reads them
    path = os.path.abspath(src.source)
    columns = None if set(want) == set(src.channels) else sorted(src.channels.index(c) for c in want)
    return path, columns


def _words(sup, seg_start: float, file, record) -> list[Word]:
    """The supervision's word alignment, segment-relative, silences dropped, order and overlaps checked."""
    items = (sup.alignment or {}).get("word")
    if items is None:
        raise BadInput("no word alignment (alignment['word'])", file=file,
                       record=record, fix="align the corpus first (e.g. MFA, then lhotse's "
                                          "with_alignment_from_ctm) or drop it with --skip-bad")
    words, prev_end = [], float("-inf")
    for item in sorted(items, key=lambda a: (a.start, a.end)):
        # 0.1 ms of slack: times stored to the microsecond make touching words overlap by one
        if item.duration < 0 or item.start < prev_end - 1e-4:
            what = "negative duration" if item.duration < 0 else "overlapping words"
            raise BadInput(f"{what} at {item.start:.3f}s in alignment['word']",
                           file=file, record=record, fix="fix the alignment or drop it with --skip-bad")
        prev_end = item.end
        label = str(item.symbol).strip()
        if label.lower() in SILENCE:
            continue
        # to the microsecond: recording time minus segment start leaves float noise (5.6 - 5.0)
        start, end = round(item.start - seg_start, 6), round(item.end - seg_start, 6)
        if start < -_TIME_TOLERANCE:
            raise BadInput(f"word {label!r} starts at {item.start:.2f}s, before the "
                           f"supervision ({seg_start:.2f}s into the recording)", file=file, record=record,
                           fix="lhotse's alignment times count from the start of the recording, not of the "
                               "supervision: add the supervision's start to them, or drop it with --skip-bad")
        words.append(Word(max(0.0, start), end, label))
    return words


def lhotse_segments(cuts=None, recordings=None, supervisions=None, limit: int = 0) -> SegmentSource:
    """One aligned segment per supervision of a CutSet (`cuts`) or of a SupervisionSet whose
    recordings are in a RecordingSet (manifest paths). A supervision that several cuts share
    (trim_to_supervisions keeps overlapping ones) is one segment."""
    file = Path(cuts or supervisions)
    pairs = []                      # (supervision or None, recording or None, start of its cut, error)
    if cuts:
        for cut in _load("CutSet", cuts):
            sups = list(getattr(cut, "supervisions", []) or [])
            rec = getattr(cut, "recording", None)
            for sup in sups:
                err = None
                if not hasattr(cut, "recording"):
                    err = BadInput(f"cut {cut.id} is a {type(cut).__name__} (padded, mixed or appended): it "
                                   f"does not point into one recording", file=file, record=f"supervision {sup.id}",
                                   fix="prepare from the cuts before pad/mix/append, or drop it with --skip-bad")
                elif rec is None:
                    err = BadInput(f"cut {cut.id} has no recording", file=file, record=f"supervision {sup.id}",
                                   fix="prepare needs the audio: CutSet.from_manifests(recordings=...)")
                pairs.append((sup, rec, cut.start, err))
    else:
        recs = {r.id: r for r in _load("RecordingSet", recordings)}
        for sup in _load("SupervisionSet", supervisions):
            err = None if sup.recording_id in recs else BadInput(
                f"names recording {sup.recording_id!r}, which {recordings} lacks",
                file=file, record=f"supervision {sup.id}", fix="give the matching recordings manifest")
            pairs.append((sup, None if err else recs[sup.recording_id], 0.0, err))

    audio = SegmentAudio(f"the lhotse manifest {file.name}")
    source, seen = [], {}
    for sup, rec, cut_start, err in pairs:
        where = (None if rec is None else rec.id, round(cut_start + sup.start, 6), sup.duration)
        if sup.id in seen:
            if seen[sup.id] == where:
                continue
            err = err or BadInput(f"two supervisions with id {sup.id!r}", file=file, record=f"supervision {sup.id}",
                                  fix="give every supervision a unique id")
        seen[sup.id] = where
        source.append((sup.id, lambda s=sup, r=rec, c=cut_start, e=err: _aligned(s, r, c, e, audio, file)))
    return source[:limit] if limit else source


def _aligned(sup, rec, cut_start: float, err, audio: SegmentAudio, file) -> AlignedSegment:
    if err is not None:
        raise err
    record = f"supervision {sup.id}"
    path, channels = _file_and_channels(rec, sup, file, record)
    start = cut_start + sup.start        # seconds into the recording
    if start < -_TIME_TOLERANCE:
        raise BadInput(f"starts {-start:.2f}s before its recording", file=file,
                       record=record, fix="trim it (lhotse: cut.trim_to_supervisions()) or drop it with --skip-bad")
    seg = Segment(id=sup.id, audio=path, offset=max(0, round(start * SAMPLE_RATE)),
                  num_samples=round(sup.duration * SAMPLE_RATE), speaker=sup.speaker or "",
                  text=sup.text or "", lang=sup.language or "en", channel=channels)
    duration = audio.duration(seg)
    words = _words(sup, seg.start, file, record)
    check_word_ends(words, duration, file, record)
    return AlignedSegment(seg, words, duration)


def prepare_lhotse(glossary, out, *, cuts=None, recordings=None, supervisions=None, alt2main=None,
                   limit: int = 0, log=print, **options) -> dict:
    """prepare.prepare_aligned on a lhotse CutSet (`cuts`), or on `recordings` + `supervisions`
    manifests; the same chunks as prepare() gives for the same audio and alignments."""
    if cuts and (recordings or supervisions):
        raise BadInput("--cuts and --recordings/--supervisions are two inputs", fix="give one of them")
    if not cuts and not (recordings and supervisions):
        raise BadInput("--recordings and --supervisions go together", fix="give both, or a CutSet with --cuts")
    gloss = load_glossary_arg(glossary, alt2main, log)
    return prepare_aligned(lhotse_segments(cuts, recordings, supervisions, limit), gloss, out, log=log,
                           **options)


# ---- out: term chunks -> CutSet -----------------------------------------------------------------

# Chunk field -> key in a cut's `custom` (audio, times, text and speaker have places of their own).
# The split is `subset`: `cut.split` is a lhotse method, which would hide a custom field of that name.
_CUSTOM = {"segment_id": "segment_id", "split": "subset", "term_start_time": "term_start_time",
           "term_end_time": "term_end_time", "extended_start_time": "extended_start_time",
           "extended_end_time": "extended_end_time"}


def _recording(path: str, rid: str, record: str):
    import soundfile as sf
    from lhotse import AudioSource, Recording
    sr, frames = audio_info(path, record=record)
    channels = sf.info(path).channels
    return Recording(id=rid, sources=[AudioSource(type="file", channels=list(range(channels)), source=path)],
                     sampling_rate=sr, num_samples=frames, duration=frames / sr)


def chunks_to_cuts(chunks: list[Chunk]):
    """A CutSet with one cut per chunk: the cut spans the chunk's audio (recording = its file), one
    supervision over the whole cut with text = the chunk's text, and `custom` = {terms,
    is_no_term_chunk, pseudo_terms, segment_id, subset (the split), term/extended times, any extra
    fields}, so `cut.terms` and `cut.is_no_term_chunk` work in lhotse. A chunk of some channels of a
    file is a MonoCut (one channel) or MultiCut on them; of all channels, a cut on all of them (a
    MultiCut for a stereo file: lhotse loads its channels, where our reader mixes them)."""
    lhotse = _lhotse()
    stems: dict[str, set] = {}
    for c in chunks:
        stems.setdefault(Path(c.audio).stem, set()).add(c.audio)
    recs, ids, out = {}, set(), []
    for c in tqdm(chunks, desc="export-cuts", unit="chunk", mininterval=1.0):
        if c.id in ids:
            raise BadInput(f"two chunks with id {c.id!r}", record=f"chunk {c.id}",
                           fix="export one prepare output (its ids are unique)")
        ids.add(c.id)
        if c.audio not in recs:
            # a recording id per file: its name, or name + path hash when two folders share a name
            stem = Path(c.audio).stem
            rid = stem if len(stems[stem]) == 1 else f"{stem}-{hashlib.sha1(c.audio.encode()).hexdigest()[:8]}"
            recs[c.audio] = _recording(c.audio, rid, f"chunk {c.id}")
        rec = recs[c.audio]
        duration = c.audio_duration if c.audio_duration is not None else rec.duration - c.audio_offset
        channels = c.channel if c.channel is not None else rec.channel_ids
        custom = {"terms": list(c.terms), "is_no_term_chunk": c.is_no_term_chunk}
        if c.pseudo_terms:
            custom["pseudo_terms"] = list(c.pseudo_terms)
        custom.update({key: getattr(c, name) for name, key in _CUSTOM.items()})
        custom.update(c.extra)
        channel = channels[0] if len(channels) == 1 else list(channels)
        sup = lhotse.SupervisionSegment(id=c.id, recording_id=rec.id, start=0.0, duration=duration,
                                        channel=channel, text=c.term_chunk_text, speaker=c.speaker or None)
        cls = lhotse.MonoCut if len(channels) == 1 else lhotse.MultiCut
        out.append(cls(id=c.id, start=c.audio_offset, duration=duration, channel=channel, recording=rec,
                       supervisions=[sup], custom=custom))
    return lhotse.CutSet.from_cuts(out)


def cuts_to_chunks(cuts) -> list[Chunk]:
    """The reverse of chunks_to_cuts (a CutSet, or the path of one): chunks again, e.g. after
    filtering the cuts in lhotse. Cuts must point into one audio file each (no mixes or transforms)."""
    if isinstance(cuts, (str, Path)):
        file, cuts = Path(cuts), _load("CutSet", cuts)
    else:
        file = None
    out = []
    for cut in cuts:
        rec = getattr(cut, "recording", None)
        if rec is None or not cut.supervisions:
            raise BadInput(f"cut {cut.id} is a {type(cut).__name__} without a recording or a supervision",
                           file=file, record=f"cut {cut.id}", fix="export it with export-cuts")
        sup = cut.supervisions[0]
        sup = dataclasses.replace(sup, channel=cut.channel)   # the cut's channels are what it plays
        path, channel = _file_and_channels(rec, sup, file, f"cut {cut.id}")
        custom = dict(cut.custom or {})
        fields = {name: custom.pop(key, None) for name, key in _CUSTOM.items()}
        out.append(Chunk(
            id=cut.id, audio=path, audio_offset=cut.start, audio_duration=cut.duration,
            term_chunk_text=sup.text or "", term_chunk_audio_ground_truth_terms=list(custom.pop("terms", [])),
            is_no_term_chunk=bool(custom.pop("is_no_term_chunk", False)), speaker=sup.speaker or "",
            pseudo_terms=list(custom.pop("pseudo_terms", [])), channel=channel,
            segment_id=fields.pop("segment_id") or "", split=fields.pop("split") or "", **fields, extra=custom))
    return out


def export_cuts(chunks_dir, out) -> dict:
    """Every manifest of a prepare output folder (train/dev/test.jsonl, or <split>.jsonl) -> one
    CutSet file (`out`, e.g. chunks.jsonl.gz); each cut's `custom` keeps its split (as `subset`)."""
    from shared.atomic import atomic_path
    from stage1_extract.extract import find_manifests
    t0 = time.time()
    chunks = []
    for split, path in find_manifests(chunks_dir).items():
        for c in read_chunks(path):
            c.split = c.split or split
            chunks.append(c)
    cuts = chunks_to_cuts(chunks)
    out = Path(out)
    with atomic_path(out) as tmp:      # keeps out's suffixes, which lhotse reads the format from
        cuts.to_file(tmp)
    return {"cuts": len(chunks), "recordings": len({c.audio for c in chunks}),
            "hours": round(sum(cut.duration for cut in cuts) / 3600, 3), "seconds": round(time.time() - t0, 2)}


@click.command("export-cuts")
@config_options
@click.option("--chunks", "chunks_dir", help="Folder of term-chunk manifests (prepare's --out). [data.chunks]")
@click.option("--out", required=True, help="CutSet file to write, e.g. chunks.jsonl.gz (lhotse reads it with "
              "CutSet.from_file).")
def export_cuts_command(cfg: Config, chunks_dir, out):
    """Write term chunks as a lhotse CutSet: one cut per chunk, supervision text = chunk text, terms
    and the no-term flag in the cut's custom fields (cut.terms, cut.is_no_term_chunk)."""
    s = export_cuts(chunks_dir or cfg.data.chunks, out)
    click.echo(f"wrote {out}: " + figures(**s))
