"""`python -m demo corpus|heldout ...` (also `termret demo-corpus|demo-heldout`)."""
import click

from demo.corpus import demo_corpus_command
from demo.heldout import demo_heldout_command
from shared.cli import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """The demo's data. corpus: synthesise the demo corpus (eSpeak NG); heldout: its test transcripts
    spoken by a held-out neural voice (Piper)."""


cli.add_command(demo_corpus_command, "corpus")
cli.add_command(demo_heldout_command, "heldout")
run_cli(cli)
