"""`bench` (`python -m bench`, `make bench`): what the design promises, measured as ratios against the seed's way in one run.

Every comparison runs both ways on the same machine, in the same process, on the same data, so
the ratio holds on a noisy machine even when the absolute seconds do not:

    extract  the seed's way (each chunk padded to 30 s = 3000 mel frames, the HF Qwen2AudioEncoder
             forward with the 4-D padding mask, one chunk at a time) against ours
             (`Backbone.audio_features` at true length, duration-bucketed batches) on the same demo
             chunks, embedded backbone with audio_unfreeze=0; min cosine of the pooled chunk vectors.
    train    one epoch with the frozen encoder inside the loop (the seed's way: every step encodes
             its chunks padded to 30 s) against the same epoch on the cache. The online epoch is
             timed on its first batch and scaled to the epoch (labelled as an estimate).
    loader   feature MB/s the training data path (`stage2_train.data.Ragged`) delivers against a
             plain sequential read of the same shard files, zarr and hdf5 (page cache warm).
    mining   one hard-negative refresh (`Trainer.refresh_hard_negatives`: text head + FAISS) over
             a synthetic 100,000-term glossary of cached text features at the real width, and its
             share of a run that refreshes every train.hard_refresh steps.
    index    Flat against an IVF index on clustered synthetic 512-d vectors (uniform random vectors
             have no neighbourhood structure, so an ANN index has nothing to exploit there).
    memory   peak RSS of extraction (child processes) on N and 4N chunks per split.

Writes `OUT/report.json` (the figures, one block per part), `OUT/details.json` (how each figure was obtained)
and prints a table. Inputs are the demo's manifests and feature cache: run `make` first.
"""
