"""`termret COMMAND ...`: every stage's commands under one name, loaded only when used (so
`termret --help` does not import torch)."""
from __future__ import annotations

import importlib

import click

from shared.cli import run_cli

# command -> (module, click object); the order is the pipeline's
COMMANDS = {
    "demo-corpus": ("demo.corpus", "demo_corpus_command"),
    "demo-heldout": ("demo.heldout", "demo_heldout_command"),
    "convert-models": ("stage1_extract.convert_whisper", "convert_models_command"),
    "prepare": ("stage1_extract.prepare", "prepare_command"),
    "export-cuts": ("stage1_extract.lhotse_io", "export_cuts_command"),
    "extract": ("stage1_extract.extract", "extract_command"),
    "verify": ("stage1_extract.extract", "verify_command"),
    "transcribe": ("stage1_extract.transcribe", "transcribe_command"),
    "train": ("stage2_train.train", "train_command"),
    "eval": ("stage3_index.cli", "eval_command"),
    "compare": ("stage3_index.cli", "compare_command"),
    "query": ("stage3_index.retriever", "query_command"),
    "talk": ("stage3_index.talk", "talk_command"),
    "ablation": ("stage3_index.ablation", "ablation_command"),
    "bench": ("bench.run", "bench_command"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Train term-level speech-to-text retrievers on cached features: prepare and extract (stage 1),
    train (stage 2), eval, compare, query, talk (stage 3). `termret COMMAND --help` explains each."""


def main():
    run_cli(cli)
