"""`ablation`: train each variant of a config on the same feature cache and put them in one table.

A variant is a name and a list of `--set` overrides on top of the base config (see
configs/ablation/variants.toml). Each is trained into `RUNS/NAME` (a finished run is reused, a killed one
resumed), evaluated on the test split of its own cache and, when given, on held-out caches
(another voice or corpus made with the same backbone), and summarised in one row:

    variant | test R@1 R@5 R@10 | seen R@10 | unseen R@10 | held-out R@10 | glossary 10k R@10 | AUROC | train s

`ablation.md` and `ablation.json` go to OUT. Users rerun this on their own data: every variant is
plain config, so the winner is one `--set` away from `make train`.
"""
from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import click

from shared.config import Config, load_config
from shared.errors import BadInput


def read_variants(path: str | Path) -> dict[str, list[str]]:
    """{name: [section.key=value, ...]} from a TOML file of `[name] set = [...]` tables, in file order."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("variants file does not exist", file=path, fix="see configs/ablation/variants.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"not valid TOML: {e}", file=path) from None
    out = {}
    for name, table in data.items():
        sets = table.get("set", []) if isinstance(table, dict) else None
        if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
            raise BadInput(f"variant {name!r} needs `set = [\"section.key=value\", ...]`", file=path)
        out[name] = sets
    if not out:
        raise BadInput("no variants", file=path, fix="add [name] tables with a set = [...] list")
    return out


def share_transcripts(src: Path, dst: Path, log=print) -> None:
    """Copy cached transcripts of splits whose manifest is byte-identical in both caches (their chunks
    are the same audio): a variant with other train manifests keeps the same cascade and fusion."""
    import shutil
    fp = json.loads((dst / "index.json").read_text())["fingerprint"]["manifests"]
    for header in sorted((src / "transcripts").glob("*.json")) if (src / "transcripts").is_dir() else []:
        split = header.stem
        if (dst / "transcripts" / header.name).is_file() or \
                json.loads(header.read_text()).get("manifest_sha256") != fp.get(split):
            continue
        (dst / "transcripts").mkdir(exist_ok=True)
        shutil.copy2(src / "transcripts" / f"{split}.jsonl", dst / "transcripts" / f"{split}.jsonl")
        shutil.copy2(header, dst / "transcripts" / header.name)     # the header last: it marks them done
        log(f"transcripts of {split} shared from {src} (same manifest)")


def _row(name: str, sets: list[str], test: dict, heldout: dict | None, seconds: float | None) -> dict:
    def get(d, *keys):
        for k in keys:
            if d is None:
                return None
            d = d.get(k) if isinstance(d, dict) else None
        return d
    sizes = test.get("by_glossary_size", {})
    big = max(sizes, key=int) if sizes else None
    return {"variant": name, "set": sets,
            "r1": get(test, "recall", "1"), "r5": get(test, "recall", "5"), "r10": get(test, "recall", "10"),
            "seen_r10": get(test, "recall_seen", "10"), "unseen_r10": get(test, "recall_unseen", "10"),
            "heldout_r10": get(heldout, "recall", "10"),
            "glossary": int(big) if big else None,
            "glossary_r10": get(sizes.get(big) if big else None, "recall", "10"),
            "auroc": get(test, "rejection", "auroc"), "train_seconds": seconds,
            "fused_r1": get(test, "fused", "recall", "1"), "fused_r10": get(test, "fused", "recall", "10"),
            "fused_heldout_r10": get(heldout, "fused", "recall", "10"),
            "baseline_r10": get(test, "baseline", "recall", "10"),
            "baseline_heldout_r10": get(heldout, "baseline", "recall", "10")}


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table_markdown(rows: list[dict]) -> str:
    head = ("| variant | R@1 | R@5 | R@10 | seen R@10 | unseen R@10 | held-out R@10 | glossary 10k R@10 "
            "| AUROC | + transcript: R@1 / R@10 / held-out R@10 | train s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['variant']} | {_fmt(r['r1'])} | {_fmt(r['r5'])} | {_fmt(r['r10'])} | "
                     f"{_fmt(r['seen_r10'])} | {_fmt(r['unseen_r10'])} | {_fmt(r['heldout_r10'])} | "
                     f"{_fmt(r['glossary_r10'])} | {_fmt(r['auroc'])} | "
                     f"{_fmt(r.get('fused_r1'))} / {_fmt(r.get('fused_r10'))} / {_fmt(r.get('fused_heldout_r10'))} | "
                     f"{'-' if r['train_seconds'] is None else round(r['train_seconds'])} |")
    base = next((r for r in rows if r.get("baseline_r10") is not None), None)
    if base:
        lines.append(f"| *cascade (ASR + fuzzy match)* | | | {_fmt(base['baseline_r10'])} | | | "
                     f"{_fmt(base['baseline_heldout_r10'])} | | | | |")
    return "\n".join(lines) + "\n"


def ablation(cfg_path: str | Path | None, variants: dict[str, list[str]], base_sets=(), *, runs="cache/runs/ablation",
             out="cache/ablation", heldout=(), only=None, log=print) -> list[dict]:
    """Train and evaluate every variant (or those in `only`); return the table rows."""
    from shared.cache import FeatureCache
    from stage1_extract.extract import extract, features_dir
    from stage2_train.train import train
    from stage3_index.evaluate import evaluate
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    base_root = None       # the first variant's cache: others with the same dev/test reuse its transcripts
    for name, sets in variants.items():
        if only and name not in only:
            continue
        cfg: Config = load_config(cfg_path, list(base_sets) + sets)
        # a variant may read other manifests (e.g. with pseudo-term chunks): its own cache, made once;
        # for the others this only checks that the cache is complete
        root = features_dir(cfg)
        if not ((root / "index.json").is_file() and FeatureCache(root).complete() and (root / "forms.json").is_file()):
            extract(cfg, log=log)
        if base_root is None:
            base_root = features_dir(cfg)
        else:
            share_transcripts(base_root, features_dir(cfg), log)
        run = runs / name
        log(f"== variant {name}: {' '.join(sets) or '(base config)'} -> {run}")
        timing = run / "train_seconds.json"        # written when the variant's training has finished
        if not timing.is_file():
            t0 = time.time()
            train(cfg, run=run, resume=True, log=log)
            timing.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
        seconds = json.loads(timing.read_text())["seconds"]
        test = evaluate(run, "test", log=log)
        held = None
        for features, split in heldout:
            held = evaluate(run, split, features=features, log=log)
        rows.append(_row(name, sets, test, held, seconds))
        _write_table(out, rows, list(variants))
    return rows


def _write_table(out: Path, rows: list[dict], order: list[str]) -> None:
    """ablation.{json,md}: these rows, plus the rows of other variants already in the table (a run with
    --only updates its rows and keeps the others), in the variants file's order."""
    path = out / "ablation.json"
    kept = {r["variant"]: r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    kept.update({r["variant"]: r for r in rows})
    table = [kept[v] for v in order if v in kept]
    path.write_text(json.dumps(table, indent=1) + "\n")
    (out / "ablation.md").write_text(table_markdown(table))


@click.command("ablation")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/demo.toml",
              show_default=True, help="Base config of every variant.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override for every variant (repeatable), e.g. --set train.epochs=8.")
@click.option("--variants", "variants_path", default="configs/ablation/variants.toml", show_default=True,
              type=click.Path(dir_okay=False), help="TOML file: [name] set = [\"section.key=value\", ...].")
@click.option("--runs", default="cache/runs/ablation", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the variants' runs (a finished run is reused).")
@click.option("--out", default="cache/ablation", show_default=True, type=click.Path(file_okay=False),
              help="Where ablation.md and ablation.json go.")
@click.option("--heldout", multiple=True, metavar="CACHE:SPLIT",
              help="Also evaluate on another cache's split, e.g. cache/features/demo-heldout:heldout.")
@click.option("--only", multiple=True, help="Run only these variants (repeatable).")
def ablation_command(config_path, overrides, variants_path, runs, out, heldout, only):
    """Train each variant of the config on the same feature cache; write one comparison table."""
    held = []
    for item in heldout:
        if ":" not in item:
            raise BadInput(f"--heldout {item!r} must look like CACHE:SPLIT")
        path, split = item.rsplit(":", 1)
        held.append((path, split))
    rows = ablation(config_path, read_variants(variants_path), overrides, runs=runs, out=out, heldout=held,
                    only=only, log=click.echo)
    click.echo(table_markdown(rows))
