"""Stage 1 command line: one click command per Python entry point of the stage."""
from __future__ import annotations

import click

from shared.cli import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Stage 1: turn the users' data into term-chunk manifests and run the frozen models once.

    \b
    prepare      MFA alignments (or a lhotse CutSet) + glossary -> term-chunk manifests (train/dev/test.jsonl)
    export-cuts  term-chunk manifests -> a lhotse CutSet (one cut per chunk)
    extract      run the frozen backbone once over chunks and glossary, cache hidden states
    verify       check every shard of a feature cache against its checksum
    transcribe   transcribe every chunk once with the backbone's own ASR (cascade baseline)
    convert-models  convert the packaged Whisper tiny.en into the Qwen2-Audio encoder class (once)
    """


def _register():
    # Commands live beside the code they drive.
    from stage1_extract.convert_whisper import convert_models_command
    from stage1_extract.extract import extract_command, verify_command
    from stage1_extract.lhotse_io import export_cuts_command   # imports lhotse only when run
    from stage1_extract.prepare import prepare_command
    from stage1_extract.transcribe import transcribe_command
    for cmd in (convert_models_command, prepare_command, export_cuts_command,
                extract_command, verify_command, transcribe_command):
        cli.add_command(cmd)


def main():
    _register()
    run_cli(cli)
