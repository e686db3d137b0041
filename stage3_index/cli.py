"""Stage 3 command line: eval, compare, query (and bench)."""
from __future__ import annotations

from pathlib import Path

import click

from shared.cli import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Stage 3: FAISS index and evaluation of trained runs, run comparison, streaming retrieval.

    \b
    eval     Recall@K (seen/unseen, glossary sizes), rejection, QPS -> RUN/eval/report.{json,md,png}
    compare  several runs side by side (config differences and metrics)
    query    the streaming retriever on a WAV file: terms with times
    bench    make bench: the design's speed and memory promises, measured as ratios in one run
    """


@cli.command("eval")
@click.option("--run", "run", required=True, type=click.Path(file_okay=False), help="Run folder (cache/runs/RUN).")
@click.option("--split", default="test", show_default=True, help="Split of the feature cache to evaluate.")
@click.option("--index", "factory", default=None,
              help="FAISS factory string, e.g. Flat, HNSW32, IVF1024,Flat, IVF1024,PQ64. [eval.index of the run]")
@click.option("--quiet", is_flag=True, help="Do not print the markdown table.")
def eval_command(run, split, factory, quiet):
    """Evaluate a run on a split of its feature cache and write the report beside the run."""
    from stage3_index.evaluate import evaluate, report_markdown
    report = evaluate(run, split, factory=factory, log=click.echo)
    if not quiet:
        click.echo(report_markdown(report, Path(run).name))


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="cache/compare", show_default=True, help="Where compare.md and compare.png go.")
def compare_command(runs, out):
    """Print RUNS side by side: config keys that differ, Recall@K, rejection, QPS; write a plot."""
    from stage3_index.compare import compare
    click.echo(compare(list(runs), out, log=click.echo))


def _register():
    from stage3_index.bench import bench_command
    from stage3_index.retriever import query_command
    cli.add_command(query_command)
    cli.add_command(bench_command)


def main():
    _register()
    run_cli(cli)
