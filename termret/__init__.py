"""termret: the whole pipeline behind one command (`termret prepare|extract|train|eval|query|...`).

The stages stay importable packages (`python -m stage1_extract ...` keeps working); this package only
puts their commands side by side, so it sits above all of them.
"""
