"""The offline demo's data: a synthetic English corpus in the users' input formats (eSpeak NG voices,
`corpus`) and a held-out neural voice speaking its test transcripts (Piper, `heldout`).

Only demo data comes from here; prepare, extract, training and the retriever never import it.
"""
