"""What every stage's click CLI shares: --config/--set, and turning BadInput into a clear exit."""
from __future__ import annotations

import functools
import sys

import click

from shared.config import Config, load_config
from shared.errors import BadInput


def config_options(f):
    """Add `--config FILE` and repeatable `--set section.key=value`; pass `cfg: Config` on."""
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="TOML config file (e.g. configs/demo.toml); defaults are used for keys it omits.")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override one config key, e.g. --set train.lr=3e-4 (repeatable).")
    @functools.wraps(f)
    def wrapper(*args, config_path=None, overrides=(), **kwargs):
        cfg = load_config(config_path, overrides)
        return f(*args, cfg=cfg, **kwargs)
    return wrapper


def run_cli(group: click.BaseCommand) -> None:
    """Entry point: BadInput -> one clear message on stderr and exit code 2, no traceback."""
    try:
        # without standalone mode click *returns* the code of `raise Exit(n)` (e.g. verify's 1)
        code = group.main(standalone_mode=False)
    except BadInput as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


def figures(**values) -> str:
    """The one line of figures long work ends with: `k=v k=v ...`."""
    parts = []
    for k, v in values.items():
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


__all__ = ["Config", "config_options", "run_cli", "figures"]
