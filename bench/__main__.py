"""`python -m bench ...` (make bench); `python -m bench memory-child ARGS` is the memory part's child."""
import sys

from shared.cli import run_cli


if len(sys.argv) == 3 and sys.argv[1] == "memory-child":
    from bench.memory import _memory_child
    _memory_child(sys.argv[2])
else:
    from bench.run import bench_command
    run_cli(bench_command)
