"""`python -m stage2_train --config ... --features ... --run-dir ...` (also under torchrun)."""
from shared.cli import run_cli
from stage2_train.train import train_command

run_cli(train_command)
