"""`python -m stage1_extract ...`: prepare, demo-corpus, extract, verify."""
from stage1_extract.cli import main

main()
