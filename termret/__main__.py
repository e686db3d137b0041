"""`python -m termret ...` = `termret ...`."""
from termret.cli import main

main()
