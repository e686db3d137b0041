"""Stage 3: FAISS indexes, evaluation, reports, run comparison, and the streaming retriever."""


def __getattr__(name):
    # `from stage3_index import Retriever` without importing torch for every CLI start
    if name == "Retriever":
        from stage3_index.retriever import Retriever
        return Retriever
    raise AttributeError(name)
