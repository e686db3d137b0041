"""`python -m stage3_index eval|compare|query|bench ...`"""
from stage3_index.cli import main

main()
