"""Records the stages pass along: segments (users' TSV) and term chunks (our JSONL manifests).

A term chunk points into its segment's audio (path, offset, duration in seconds) instead of
being a WAV file of its own: millions of tiny files are what strained the seed's file system.
Its fields are a superset of the seed's term-chunk record, so the seed's JSON/JSONL files load
as they are (`read_chunks` accepts both).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from shared import fields
from shared.errors import BadInput, RejectLog
from shared.glossary import Glossary, normalize

SAMPLE_RATE = 16000


@dataclass
class Segment:
    id: str
    audio: str                 # absolute path of the audio file
    offset: int                # samples into the file (16 kHz)
    num_samples: int           # -1 = to the end of the file
    speaker: str
    text: str
    lang: str = "en"
    # Which channels of the file hold this segment (0-based, mixed to mono); None = all of them.
    # Only lhotse input sets it (one speaker per channel of a stereo call); a TSV segment is the whole file.
    channel: list[int] | None = None

    @property
    def start(self) -> float:
        return self.offset / SAMPLE_RATE

    @property
    def duration(self) -> float | None:
        return None if self.num_samples < 0 else self.num_samples / SAMPLE_RATE


SEGMENT_COLUMNS = ["id", "audio", "n_frames", "speaker", "src_text", "src_lang"]


def parse_audio_field(value: str, base: Path) -> tuple[str, int, int]:
    """`path` or `path:offset_samples:num_samples`; relative paths are relative to the TSV."""
    parts = value.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        path, offset, num = parts[0], int(parts[1]), int(parts[2])
    else:
        path, offset, num = value, 0, -1
    p = Path(path)
    if not p.is_absolute():
        # absolute, so manifests written elsewhere (prepare's --out) still point at the audio
        p = Path(os.path.abspath(base / p))
    return str(p), offset, num


def read_segments(path: str | Path) -> list[Segment]:
    """GigaSpeech-style TSV: id, audio, n_frames, speaker, src_text, src_lang (header optional)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("segments file does not exist", file=path, fix="check --segments / data.segments")
    out, seen = [], set()
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            # newlines only: str.splitlines also splits at \x0b, \x1c, U+2028... which text may hold
            lines = [x.rstrip("\r") for x in f.read().split("\n")]
        except UnicodeDecodeError as e:
            raise BadInput(f"not UTF-8 (byte {e.start})", file=path, fix="re-encode as UTF-8") from None
    cols = SEGMENT_COLUMNS
    start = 0
    if lines and lines[0].split("\t")[0] == "id":
        cols = lines[0].split("\t")
        start = 1
        missing = [c for c in ("id", "audio", "speaker", "src_text") if c not in cols]
        if missing:
            raise BadInput(f"header lacks columns {missing}", file=path, record=1,
                           fix=f"columns are {', '.join(SEGMENT_COLUMNS)}")
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) < len(cols):
            raise BadInput(f"expected {len(cols)} tab-separated columns, found {len(values)}", file=path,
                           record=lineno, fix=f"columns are {', '.join(cols)}")
        row = dict(zip(cols, values))
        for col in ("id", "audio"):
            if not row[col].strip():
                raise BadInput(f"empty {col}", file=path, record=lineno,
                               fix=f"give every segment its {col} (columns are {', '.join(cols)})")
        audio, offset, num = parse_audio_field(row["audio"], path.parent)
        if num == 0:
            raise BadInput(f"audio {row['audio']!r} spans 0 samples", file=path, record=lineno,
                           fix="give path:offset_samples:num_samples with num_samples > 0, or the path alone")
        if row["id"] in seen:
            raise BadInput(f"duplicate segment id {row['id']!r}", file=path, record=lineno)
        seen.add(row["id"])
        out.append(Segment(id=row["id"], audio=audio, offset=offset, num_samples=num,
                           speaker=row.get("speaker", ""), text=row.get("src_text", ""),
                           lang=row.get("src_lang", "en")))
    return out


@dataclass
class Chunk:
    """One term chunk (or no-term chunk, or pseudo-term chunk): the unit stage 1 encodes and stage 2
    trains on. A pseudo-term chunk (stage1_extract/pseudo.py) is cut like a term chunk around a
    word or n-gram that is no glossary term; its target is `pseudo_terms` (normalised written
    forms), its glossary terms are empty, and it is not a no-term chunk."""
    id: str
    audio: str
    audio_offset: float                       # seconds into the audio file
    audio_duration: float | None              # seconds; None = to the end of the file
    term_chunk_text: str
    term_chunk_audio_ground_truth_terms: list[str]   # canonical main keys
    is_no_term_chunk: bool = False
    segment_id: str = ""
    term_start_time: float | None = None      # segment-relative seconds
    term_end_time: float | None = None
    extended_start_time: float | None = None
    extended_end_time: float | None = None
    speaker: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)
    pseudo_terms: list[str] = field(default_factory=list)
    channel: list[int] | None = None          # the file's channels to mix (0-based); None = all

    @property
    def terms(self) -> list[str]:
        return self.term_chunk_audio_ground_truth_terms

    def to_json(self) -> str:
        d = asdict(self)
        extra = d.pop("extra")
        # written only when there are some, so manifests without pseudo-terms stay as they were
        pseudo = d.pop("pseudo_terms")
        if pseudo:
            d["pseudo_terms"] = pseudo
        if d["channel"] is None:             # likewise: only chunks of one channel of a multi-channel file
            del d["channel"]
        d.update(extra)
        return json.dumps(d, ensure_ascii=False)


# A chunk is a term with its context: seconds long. The audio encoders take at most 30 s (extract
# refuses longer ones by name); a duration above this is not a chunk but a unit mistake (ms, samples).
MAX_CHUNK_SECONDS = 600.0


def _chunk_from_dict(d: dict, base: Path, index: int) -> Chunk:
    """Our manifest record, or the seed's (term_chunk_audio = a WAV of its own). Every field is read
    with its type and range (shared/fields.py): a KeyError names a missing field, a FieldError
    (a ValueError) a bad value."""
    chunk_text = fields.text(d, "term_chunk_text")
    if "audio" in d:
        audio = fields.text(d, "audio")
        offset = fields.number(d, "audio_offset", 0.0, low=0.0)
        duration = fields.number(d, "audio_duration", None, low=0.0, low_open=True, high=MAX_CHUNK_SECONDS)
    elif "term_chunk_audio" in d:
        audio, offset, duration = fields.text(d, "term_chunk_audio"), 0.0, None
    else:
        raise KeyError("audio (or the seed's term_chunk_audio)")
    if not audio.strip():
        raise fields.FieldError("audio", audio, "give the audio file's path")
    if not Path(audio).is_absolute():
        audio = str(base / audio)
    terms = fields.text_list(d, "term_chunk_audio_ground_truth_terms")
    if not all(normalize(t) for t in terms):
        raise fields.FieldError("term_chunk_audio_ground_truth_terms", terms, "give non-empty terms")
    no_term = fields.flag(d, "is_no_term_chunk")
    pseudo = fields.text_list(d, "pseudo_terms", [])
    if not all(normalize(p) for p in pseudo):
        raise fields.FieldError("pseudo_terms", pseudo, "give non-empty strings")
    pseudo = list(dict.fromkeys(normalize(p) for p in pseudo))
    channel = d.get("channel")
    if channel is not None and (not isinstance(channel, list) or not channel or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in channel)):
        raise fields.FieldError("channel", channel, "give a non-empty list of channel numbers (0-based)")
    times = {k: fields.number(d, k, None, low=0.0) for k in
             ("term_start_time", "term_end_time", "extended_start_time", "extended_end_time")}
    fields.span(times["term_start_time"], times["term_end_time"], ("term_start_time", "term_end_time"))
    fields.span(times["extended_start_time"], times["extended_end_time"],
                ("extended_start_time", "extended_end_time"))
    seg = fields.text(d, "segment_id", "", ids=True)
    cid = fields.text(d, "id", "", ids=True) or fields.text(d, "utter_id", "", ids=True) or (
        Path(d["term_chunk_audio"]).stem if d.get("term_chunk_audio") else f"{seg}_{index}")
    known = {f for f in Chunk.__dataclass_fields__} | {"term_chunk_audio"}
    return Chunk(
        id=cid, audio=audio, audio_offset=offset, audio_duration=duration,
        term_chunk_text=chunk_text, term_chunk_audio_ground_truth_terms=terms,
        is_no_term_chunk=no_term, segment_id=seg, **times,
        speaker=fields.text(d, "speaker", "", ids=True), split=fields.text(d, "split", ""),
        extra={k: v for k, v in d.items() if k not in known}, pseudo_terms=pseudo, channel=channel,
    )


def _iter_raw(path: Path) -> Iterator[tuple[int, dict | BadInput]]:
    """(line or item number, record dict or the error for that record)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise BadInput(f"non-UTF-8 bytes at line {line}", file=path,
                       fix="re-encode the manifest as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # the seed's JSON array
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"invalid JSON at line {e.lineno}: {e.msg}", file=path) from None
        for i, d in enumerate(data):
            yield i + 1, d if isinstance(d, dict) else BadInput(
                "record is not a JSON object", file=path, record=f"item {i + 1}")
        return
    # newlines only: str.splitlines also splits at U+2028, \x1c... which write_chunks leaves unescaped
    # in a chunk's text (ensure_ascii=False), so a record holding one would come back as two bad lines
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadInput(f"invalid JSON: {e.msg}", file=path, record=lineno,
                                   fix="fix the line or drop it with --skip-bad")
            continue
        yield lineno, d if isinstance(d, dict) else BadInput("record is not a JSON object", file=path,
                                                             record=lineno)


def read_chunks(path: str | Path, glossary: Glossary | None = None, *, skip_bad: bool = False,
                rejects: RejectLog | None = None) -> list[Chunk]:
    """Read a chunk manifest (ours or the seed's, JSON array or JSONL) and validate each record.

    With a glossary, terms are mapped to their canonical main key (aliases resolved) and a term
    not in the glossary is an error. Without --skip-bad the first bad record stops the read;
    with it, bad records go to `rejects` with their reason.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput("manifest does not exist", file=path, fix="run prepare first or check the path")
    out: list[Chunk] = []
    ids: dict[str, int] = {}
    for lineno, d in _iter_raw(path):
        try:
            if isinstance(d, BadInput):
                raise d
            try:
                c = _chunk_from_dict(d, path.parent, lineno)
            except KeyError as e:
                raise BadInput(f"missing required field {e.args[0]}", file=path, record=lineno,
                               fix="add the field or drop the record with --skip-bad") from None
            except (TypeError, ValueError) as e:       # fields.FieldError names the field and the fix
                raise BadInput(str(e), file=path, record=lineno,
                               fix="correct the value or drop the record with --skip-bad") from None
            if not c.is_no_term_chunk and not c.terms and not c.pseudo_terms:
                raise BadInput(f"chunk {c.id!r} has no terms and is not marked is_no_term_chunk",
                               file=path, record=lineno,
                               fix="list its terms or set is_no_term_chunk: true")
            if c.is_no_term_chunk and c.terms:
                raise BadInput(f"chunk {c.id!r} is marked is_no_term_chunk but lists terms {c.terms}",
                               file=path, record=lineno)
            if c.pseudo_terms and (c.terms or c.is_no_term_chunk):
                raise BadInput(f"chunk {c.id!r} lists pseudo_terms {c.pseudo_terms} and is also "
                               + ("a no-term chunk" if c.is_no_term_chunk else f"a term chunk of {c.terms}"),
                               file=path, record=lineno,
                               fix="a pseudo-term chunk has no glossary terms and is_no_term_chunk false")
            if glossary is not None:
                for p in c.pseudo_terms:
                    if glossary.canonical(p) is not None:
                        raise BadInput(f"chunk {c.id!r}: pseudo-term {p!r} is a glossary term "
                                       f"({glossary.source})", file=path, record=lineno,
                                       fix="list it in term_chunk_audio_ground_truth_terms instead, or "
                                           "re-run prepare with this glossary")
            if glossary is not None and c.terms:
                canon = []
                for t in c.terms:
                    key = glossary.canonical(t)
                    if key is None:
                        raise BadInput(f"chunk {c.id!r}: term {t!r} is not in the glossary "
                                       f"({glossary.source})", file=path, record=lineno,
                                       fix="add it to the glossary or alt2main, or drop the record with --skip-bad")
                    if key not in canon:
                        canon.append(key)
                c.term_chunk_audio_ground_truth_terms = canon
            if c.id in ids:
                raise BadInput(f"duplicate chunk id {c.id!r} (first at line {ids[c.id]})", file=path,
                               record=lineno, fix="give every chunk a unique id")
        except BadInput as err:
            if not skip_bad:
                raise
            if rejects is not None:
                rejects.add(err, record=d if isinstance(d, dict) else None)
            continue
        ids[c.id] = lineno
        out.append(c)
    return out


def write_chunks(chunks: list[Chunk], path: str | Path) -> None:
    """Write a manifest atomically (temp file, then rename): a killed run never leaves half a file."""
    from shared.atomic import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(c.to_json() + "\n")
