"""`ablation`: train each variant of a config on the same feature cache, pick one on dev, report all.

A variant is a name and a list of `--set` overrides on top of the base config (see
configs/ablation/variants.toml). Each is trained into `RUNS/NAME` (a finished run is reused, a killed one
resumed), evaluated on the dev and test splits of its own cache and, when given, on held-out caches
(another voice or corpus made with the same backbone), and summarised in one row of dev, test and
held-out figures.

The choice is made on dev only (`PICK_RULE`: the highest dev R@10, ties broken by dev unseen-term R@10,
then dev R@1); test and held-out only report. A variant can opt out of the pick (`pick = false` in the
variants file: a row shown for what it demonstrates, e.g. a known leak). The picked variant and the base
(the variant with no overrides, or `--base`) are then trained again with `train.seed` 1..N-1
(`RUNS/NAME.seedS`, beside the seed-0 run) and given as mean and min-max over the N seeds: one seed's luck
is about as large as the differences between good variants on the demo.

`ablation.md` and `ablation.json` go to OUT. Users rerun this on their own data: every variant is
plain config, so the winner is one `--set` away from `make train`.
"""
from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click

from shared.config import Config, config_from_dict, diff_configs, load_config
from shared.errors import BadInput

# dev figures compared in this order, higher is better; an exact tie falls to the earlier row of the file
PICK_RULE = ("r10", "unseen_r10", "r1")
RULE_TEXT = "the highest dev R@10, ties broken by dev unseen-term R@10, then dev R@1"
# the figures given for every split (dev, test, held-out) and for the seeds' mean and spread
SPLIT_FIGURES = ("r1", "r10", "unseen_r1", "unseen_r10", "glossary_r10")


@dataclass
class Variant:
    sets: list[str]
    candidate: bool = True          # `pick = false`: shown in the table, never picked


def read_variants(path: str | Path) -> dict[str, Variant]:
    """{name: Variant} from a TOML file of `[name] set = [...]` (optional `pick = false`) tables, in file order."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("variants file does not exist", file=path, fix="see configs/ablation/variants.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"not valid TOML: {e}", file=path) from None
    out = {}
    for name, table in data.items():
        if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
            raise BadInput(f"variant {name!r}: the name is a run folder's name: no slashes, no leading dot",
                           file=path)
        sets = table.get("set", []) if isinstance(table, dict) else None
        if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
            raise BadInput(f"variant {name!r} needs `set = [\"section.key=value\", ...]`", file=path)
        unknown = sorted(set(table) - {"set", "pick"})
        if unknown:
            raise BadInput(f"variant {name!r}: unknown key {unknown[0]!r}", file=path,
                           fix="a variant has `set` and `pick`")
        if not isinstance(table.get("pick", True), bool):
            raise BadInput(f"variant {name!r}: `pick` is {table['pick']!r}: give true or false", file=path)
        out[name] = Variant(sets, table.get("pick", True))
    if not out:
        raise BadInput("no variants", file=path, fix="add [name] tables with a set = [...] list")
    return out


def default_base(variants: dict[str, Variant]) -> str:
    """The base config itself (the first variant without overrides), else the first variant."""
    return next((n for n, v in variants.items() if not v.sets), next(iter(variants)))


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


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def split_figures(report: dict | None) -> dict | None:
    """The figures of one eval report (RUN/eval/SPLIT/report.json) the table shows."""
    if report is None:
        return None
    sizes = report.get("by_glossary_size") or {}
    big = max(sizes, key=int) if sizes else None
    return {"r1": _get(report, "recall", "1"), "r5": _get(report, "recall", "5"),
            "r10": _get(report, "recall", "10"), "seen_r10": _get(report, "recall_seen", "10"),
            "unseen_r1": _get(report, "recall_unseen", "1"), "unseen_r10": _get(report, "recall_unseen", "10"),
            "glossary": int(big) if big else None,
            "glossary_r10": _get(sizes.get(big) if big else None, "recall", "10"),
            "auroc": _get(report, "rejection", "auroc"),
            "fused_r1": _get(report, "fused", "recall", "1"), "fused_r10": _get(report, "fused", "recall", "10"),
            "baseline_r10": _get(report, "baseline", "recall", "10"),
            "queries": report.get("queries"), "unseen_queries": report.get("unseen_queries")}


def make_row(name: str, variant: Variant, base_sets, seed: int, dev: dict | None, test: dict | None,
             heldout: dict[str, dict] | None, seconds: float | None) -> dict:
    """One run's row: the variant, its seed, and the figures of its dev, test and held-out reports
    (`heldout`: {label: report}; the table shows the first)."""
    held = {label: split_figures(r) for label, r in (heldout or {}).items()}
    return {"variant": name, "set": list(variant.sets), "base_sets": list(base_sets), "seed": seed,
            "candidate": variant.candidate, "dev": split_figures(dev), "test": split_figures(test),
            "heldout": next(iter(held.values()), None), "heldouts": held, "train_seconds": seconds}


def pick(rows: list[dict], rule=PICK_RULE) -> str | None:
    """The variant of `rows` (seed-0 rows, in the variants file's order) with the best dev figures under
    `rule`; test and held-out figures are never read. None when no candidate has every dev figure."""
    best = None
    for r in rows:
        dev = r.get("dev") or {}
        if not r.get("candidate", True) or any(dev.get(k) is None for k in rule):
            continue
        key = tuple(dev[k] for k in rule)
        if best is None or key > best[0]:              # strictly better: a tie keeps the earlier row
            best = (key, r["variant"])
    return best[1] if best else None


def seed_summary(rows: list[dict], splits=("dev", "test", "heldout"), figs=SPLIT_FIGURES) -> dict:
    """{"seeds": [...], split: {figure: {"mean", "min", "max", "n"}}} over one variant's runs (one per seed);
    a figure missing from some runs is summarised over the others (`n` says how many)."""
    out = {"seeds": sorted(r["seed"] for r in rows)}
    for split in splits:
        part = {}
        for f in figs:
            vals = [v for r in rows if (v := _get(r, split, f)) is not None]
            part[f] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)} \
                if vals else None
        out[split] = part
    return out


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _size_label(rows: list[dict]) -> str:
    sizes = {f["glossary"] for r in rows for s in ("dev", "test", "heldout") if (f := r.get(s)) and f.get("glossary")}
    if len(sizes) != 1:
        return "largest glossary"
    n = sizes.pop()
    return f"glossary {n // 1000}k" if n % 1000 == 0 else f"glossary {n}"


def _split_head(prefix: str, size: str) -> list[str]:
    return [f"{prefix} R@1", f"{prefix} R@10", f"{prefix} unseen R@1", f"{prefix} unseen R@10", f"{prefix} {size} R@10"]


def table_markdown(rows: list[dict], seeds: int = 1, base: str | None = None) -> str:
    """The table of seed-0 rows (dev beside test and held-out, the picked row marked), the rule, then the
    picked variant and the base as mean (min-max) over their seeds' runs."""
    first = [r for r in rows if r.get("seed", 0) == 0]
    chosen = pick(first)
    size = _size_label(rows)
    head = (["variant"] + _split_head("dev", size) +
            ["test R@1", "test R@5", "test R@10", "test seen R@10", "test unseen R@1", "test unseen R@10",
             f"test {size} R@10", "test AUROC"] + _split_head("held-out", size) +
            ["+ transcript: test R@1 / R@10 / held-out R@10", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def split_cells(f):
        return [_fmt(_get(f, k)) for k in SPLIT_FIGURES]

    for r in first:
        t = r.get("test") or {}
        name = r["variant"]
        if name == chosen:
            name = f"**{name}** (picked)"
        elif not r.get("candidate", True):
            name = f"{name} (shown only)"
        cells = ([name] + split_cells(r.get("dev")) +
                 [_fmt(t.get(k)) for k in ("r1", "r5", "r10", "seen_r10", "unseen_r1", "unseen_r10", "glossary_r10",
                                           "auroc")] + split_cells(r.get("heldout")) +
                 [f"{_fmt(t.get('fused_r1'))} / {_fmt(t.get('fused_r10'))} / "
                  f"{_fmt(_get(r, 'heldout', 'fused_r10'))}",
                  "-" if r.get("train_seconds") is None else str(round(r["train_seconds"]))])
        lines.append("| " + " | ".join(cells) + " |")
    cascade = next((r for r in first
                    if any(_get(r, s, "baseline_r10") is not None for s in ("dev", "test", "heldout"))), None)
    if cascade:
        def r10_only(s):
            return ["", _fmt(_get(cascade, s, "baseline_r10")), "", "", ""]
        lines.append("| " + " | ".join(["*cascade (ASR + fuzzy match)*"] + r10_only("dev") +
                                       ["", "", _fmt(_get(cascade, "test", "baseline_r10"))] + [""] * 5 +
                                       r10_only("heldout") + ["", ""]) + " |")
    out = "\n".join(lines) + "\n\n"
    if chosen is None:
        out += f"No variant picked: no candidate has dev figures yet (the rule: {RULE_TEXT}).\n"
        return out
    out += (f"Picked on dev: **{chosen}**, by {RULE_TEXT}. Test and held-out figures only report; they "
            f"played no part in the choice.\n")

    names = list(dict.fromkeys([chosen] + ([base] if base else [])))
    summaries = {n: seed_summary([r for r in rows if r["variant"] == n and r.get("seed", 0) < seeds]) for n in names}
    head = ["variant", "seeds"] + _split_head("dev", size) + _split_head("test", size) + _split_head("held-out", size)
    lines = ["", f"The picked variant and the base over training seeds (train.seed 0..{seeds - 1}): "
                 "mean (min-max).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        s = summaries[n]
        role = " and ".join(x for x, ok in (("picked", n == chosen), ("base", n == base)) if ok)
        cells = [f"{n} ({role})", ",".join(map(str, s["seeds"]))]
        for split in ("dev", "test", "heldout"):
            for f in SPLIT_FIGURES:
                m = s[split][f]
                cells.append("-" if m is None else
                             f"{m['mean']:.3f} ({m['min']:.3f}-{m['max']:.3f})" if m["n"] > 1 else f"{m['mean']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    out += "\n".join(lines) + "\n"
    if base and base != chosen:
        a, b = summaries[chosen]["dev"]["r10"], summaries[base]["dev"]["r10"]
        if a and b:
            overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
            verdict = ("fewer than 2 seeds of one of them: rerun with --seeds 3 before believing it"
                       if min(a["n"], b["n"]) < 2 else
                       "their seed ranges overlap: within seed noise" if overlap else
                       "their seed ranges do not overlap")
            out += (f"\nDev R@10, {chosen} minus {base}: {a['mean'] - b['mean']:+.3f} (means over {a['n']} and "
                    f"{b['n']} seeds); {verdict}.\n")
    elif base == chosen:
        out += "\nThe base config is the pick.\n"
    return out


def seed_run(runs: Path, name: str, seed: int) -> Path:
    """Seed 0 in RUNS/NAME (the table's row); the other seeds beside it in RUNS/NAME.seedS."""
    return runs / name if seed == 0 else runs / f"{name}.seed{seed}"


def check_finished_run(run: Path, cfg: Config) -> None:
    """A finished run is reused only when it was trained with this config (keys a resumed run may change
    aside): a variant redefined in the variants file must not keep the old variant's figures."""
    from stage2_train.train import free_to_change
    saved = config_from_dict(json.loads((run / "config.json").read_text())).to_dict()
    diff = {k: v for k, v in diff_configs(json.loads(json.dumps(saved)), json.loads(json.dumps(cfg.to_dict()))).items()
            if not free_to_change(k)}
    if diff:
        raise BadInput("this finished run was trained with other settings: " + "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()), file=run,
            fix="delete the folder to train the variant as now defined, or give --runs another folder")


def ablation(cfg_path: str | Path | None, variants: dict[str, Variant], base_sets=(), *,
             runs="cache/runs/ablation", out="cache/ablation", heldout=(), only=None, seeds: int = 3,
             base: str | None = None, log=print) -> list[dict]:
    """Train and evaluate every variant (or those in `only`) on seed 0, pick one on dev, then train the
    picked variant and the base on seeds 1..seeds-1 (when they are among those run); return every row
    of the table (kept rows of variants not run included)."""
    from shared.cache import FeatureCache
    from shared.cli import figures
    from stage1_extract.extract import extract, features_dir
    from stage2_train.train import train
    from stage3_index.evaluate import evaluate
    if seeds < 1:
        raise BadInput(f"--seeds {seeds}: give at least 1")
    for n in list(only or []) + ([base] if base else []):
        if n not in variants:
            raise BadInput(f"no variant {n!r} (the variants are: {', '.join(variants)})")
    base = base or default_base(variants)
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    table = {(r["variant"], r["seed"]): r for r in _stored_rows(out, variants, base_sets, log)}
    selected = [n for n in variants if not only or n in only]
    base_root = None       # the first variant's cache: others with the same dev/test reuse its transcripts

    def run_one(name: str, seed: int) -> None:
        nonlocal base_root
        v = variants[name]
        cfg: Config = load_config(cfg_path, list(base_sets) + v.sets + [f"train.seed={seed}"])
        # a variant may read other manifests (e.g. with pseudo-term chunks): its own cache, made once;
        # for the others this only checks that the cache is complete
        root = features_dir(cfg)
        if not ((root / "index.json").is_file() and FeatureCache(root).complete() and (root / "forms.json").is_file()):
            extract(cfg, log=log)
        if base_root is None:
            base_root = root
        elif root.resolve() != base_root.resolve():
            share_transcripts(base_root, root, log)
        run = seed_run(runs, name, seed)
        log(f"== variant {name}, train.seed {seed}: {' '.join(v.sets) or '(base config)'} -> {run}")
        timing = run / "train_seconds.json"        # written when the variant's training has finished
        if timing.is_file():
            check_finished_run(run, cfg)
        else:
            t0 = time.time()
            train(cfg, run=run, resume=True, log=log)
            timing.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
        seconds = json.loads(timing.read_text())["seconds"]
        dev = evaluate(run, "dev", log=log)
        test = evaluate(run, "test", log=log)
        held = {f"{Path(features).name}.{split}": evaluate(run, split, features=features, log=log)
                for features, split in heldout}
        table[(name, seed)] = make_row(name, v, base_sets, seed, dev, test, held, seconds)
        _write_table(out, list(table.values()), variants, seeds, base)

    for name in selected:
        run_one(name, 0)
    chosen = pick([table[(n, 0)] for n in variants if (n, 0) in table])
    # the seeds of the pick and the base: only for variants this call runs (--only keeps the others' rows)
    for name in dict.fromkeys(n for n in (chosen, base) if n in selected):
        for seed in range(1, seeds):
            run_one(name, seed)
    rows = _write_table(out, list(table.values()), variants, seeds, base)
    picked = next((r for r in rows if r["variant"] == chosen and r["seed"] == 0), None)
    dev_r10, test_r10 = _get(picked, "dev", "r10"), _get(picked, "test", "r10")
    log(figures(variants=len(selected), picked=chosen or "-", dev_r10=float("nan") if dev_r10 is None else dev_r10,
                test_r10=float("nan") if test_r10 is None else test_r10, seconds=time.time() - t_start))
    return rows


def _stored_rows(out: Path, variants: dict[str, Variant], base_sets, log=print) -> list[dict]:
    """The rows of ablation.json still valid: variant in the file with the same overrides and the same
    --set for all; others (a redefined variant, an older table format) are dropped with a message."""
    path = out / "ablation.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        log(f"{path}: a table of an older format (no dev figures): its rows are dropped")
        return []
    kept = []
    for r in data["rows"]:
        v = variants.get(r.get("variant"))
        if v is not None and r.get("set") == v.sets and r.get("base_sets") == list(base_sets):
            kept.append({**r, "candidate": v.candidate})
        else:
            log(f"{path}: row {r.get('variant')!r} (seed {r.get('seed')}) dropped: the variant is gone or redefined")
    return kept


def _write_table(out: Path, rows: list[dict], variants: dict[str, Variant], seeds: int, base: str) -> list[dict]:
    """ablation.{json,md} from every row (seed 0 and the others), in the variants file's order; the pick
    and the seed summaries are worked out again from the rows each time."""
    order = {n: i for i, n in enumerate(variants)}
    rows = sorted(rows, key=lambda r: (order[r["variant"]], r["seed"]))
    chosen = pick([r for r in rows if r["seed"] == 0])
    summary = {n: seed_summary([r for r in rows if r["variant"] == n and r["seed"] < seeds])
               for n in dict.fromkeys((chosen, base)) if n and any(r["variant"] == n for r in rows)}
    data = {"rule": RULE_TEXT, "pick_rule": list(PICK_RULE), "picked": chosen, "base": base, "seeds": seeds,
            "summary": summary, "rows": rows}
    (out / "ablation.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "ablation.md").write_text(table_markdown(rows, seeds, base))
    return rows


@click.command("ablation")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/demo.toml",
              show_default=True, help="Base config of every variant.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override for every variant (repeatable), e.g. --set train.epochs=8.")
@click.option("--variants", "variants_path", default="configs/ablation/variants.toml", show_default=True,
              type=click.Path(dir_okay=False), help="TOML file: [name] set = [\"section.key=value\", ...].")
@click.option("--runs", default="cache/runs/ablation", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the variants' runs (a finished run is reused); seed S>0 in NAME.seedS.")
@click.option("--out", default="cache/ablation", show_default=True, type=click.Path(file_okay=False),
              help="Where ablation.md and ablation.json go.")
@click.option("--heldout", multiple=True, metavar="CACHE:SPLIT",
              help="Also evaluate on another cache's split, e.g. cache/features/demo-heldout:heldout "
                   "(the table shows the first; ablation.json has all).")
@click.option("--only", multiple=True, help="Run only these variants (repeatable); the other rows are kept.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Training seeds (train.seed 0..N-1) of the picked variant and the base; 1 for a quick check.")
@click.option("--base", default=None, help="The variant the pick is set against [default: the one without overrides].")
def ablation_command(config_path, overrides, variants_path, runs, out, heldout, only, seeds, base):
    """Train each variant on the same feature cache, pick one on dev, write one comparison table."""
    held = []
    for item in heldout:
        if ":" not in item:
            raise BadInput(f"--heldout {item!r} must look like CACHE:SPLIT")
        path, split = item.rsplit(":", 1)
        held.append((path, split))
    variants = read_variants(variants_path)
    rows = ablation(config_path, variants, overrides, runs=runs, out=out, heldout=held, only=only, seeds=seeds,
                    base=base, log=click.echo)
    click.echo(table_markdown(rows, seeds, base or default_base(variants)))
