"""Stage 3 command line: eval, compare, query, ablation."""
from __future__ import annotations

from pathlib import Path

import click

from shared.cli import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Stage 3: FAISS index and evaluation of trained runs, run comparison, streaming retrieval.

    \b
    eval     Recall@K (seen/unseen, glossary sizes), rejection, QPS, baseline -> RUN/eval/SPLIT/report.{json,md}
    compare  several runs side by side (config differences and metrics)
    query    a talk's glossary, top-K candidates per window of a WAV file or a live PCM stream
    ablation train each variant of a config on the same cache; one comparison table (make ablation)
    talk     whole recordings streamed at the default threshold: terms found, false hints/min, delay (make talks)
    """


@cli.command("eval")
@click.option("--run", "run", required=True, type=click.Path(file_okay=False), help="Run folder (cache/runs/RUN).")
@click.option("--features", type=click.Path(file_okay=False), default=None,
              help="Another feature cache (another corpus, its own glossary) made with the run's backbone; "
                   "its report goes to RUN/eval/CACHENAME.SPLIT/. [the run's own cache: RUN/eval/SPLIT/]")
@click.option("--split", default=None, help="Split to evaluate. [eval.split, test]")
@click.option("--index", "factory", default=None,
              help="FAISS factory string, e.g. Flat, HNSW32, IVF1024,Flat, IVF1024,PQ64. [eval.index of the run]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file whose keys override the run's saved config (eval.* keys matter here).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config key, e.g. --set eval.glossary_sizes=1000,10000,100000 (repeatable).")
@click.option("--quiet", is_flag=True, help="Do not print the markdown table.")
@click.option("--no-second", "no_second", is_flag=True,
              help="The first stage alone, although the run has a second stage (RUN/second.pt).")
def eval_command(run, features, split, factory, config_path, overrides, quiet, no_second):
    """Evaluate a run on a split of its feature cache (or of another cache with --features): Recall@K
    seen/unseen, glossary sizes padded with real distractors, rejection, QPS, the cascade baseline."""
    from stage3_index.evaluate import evaluate, report_markdown
    report = evaluate(run, split, features=features, config=config_path, overrides=overrides, factory=factory,
                      second=not no_second, log=click.echo)
    if not quiet:
        click.echo(report_markdown(report, Path(run).name))
    click.echo(f"report: {report['out']}/report.json")


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="cache/compare", show_default=True, help="Where compare.md and compare.png go.")
@click.option("--split", default="dev", show_default=True,
              help="Whose reports (RUN/eval/SPLIT/report.json): dev, where choices are made; test only reports.")
def compare_command(runs, out, split):
    """Print RUNS side by side: config keys that differ, Recall@K, rejection, QPS; write a plot."""
    from stage3_index.compare import compare
    click.echo(compare(list(runs), out, log=click.echo, split=split))


def _register():
    from stage3_index.ablation import ablation_command
    from stage3_index.retriever import query_command
    from stage3_index.talk import talk_command
    cli.add_command(query_command)
    cli.add_command(ablation_command)
    cli.add_command(talk_command)


def main():
    _register()
    run_cli(cli)
