"""Everything distributed in training, in one place (the loss and the heads know nothing of ranks).

A step's batch is global (the same item list on every rank); rank r encodes its slice
batch[r*B:(r+1)*B], which is shorter at an epoch's end and can be empty. `gather_rows` all-gathers the
slices' embeddings with their gradient, padding each to B rows first (all_gather needs one shape on
every rank) and keeping only the real rows, so every rank holds the global batch's embeddings in item
order: the same loss as one process with the whole batch. `average_gradients` then averages every
trainable parameter's gradient, zeros standing in where a rank had no gradient (an empty slice never
ran the audio side), so all ranks make the same collective calls in the same order.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world size): from torchrun's environment (WORLD_SIZE), else one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def slice_sizes(n_items: int, per_rank: int, world: int) -> list[int]:
    """Items each rank encodes of a global batch of `n_items` (rank r: items [r*B, (r+1)*B))."""
    return [max(0, min(per_rank, n_items - r * per_rank)) for r in range(world)]


def gather_rows(local: torch.Tensor, sizes: list[int], per_rank: int) -> torch.Tensor:
    """(sum(sizes), P): every rank's rows in rank order, differentiable (each rank's gradient flows back
    to the rank that computed the rows)."""
    world = len(sizes)
    if world == 1:
        return local
    from torch.distributed.nn.functional import all_gather
    pad = per_rank - local.shape[0]
    if pad:
        # an empty slice still takes part in the backward collective: its padding is a leaf that wants grad
        filler = torch.zeros(pad, local.shape[1], dtype=local.dtype, device=local.device,
                             requires_grad=not local.requires_grad)
        local = torch.cat([local, filler], dim=0)
    parts = all_gather(local)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def average_gradients(params, world: int, sparse=frozenset()) -> None:
    """Mean of each trainable parameter's gradient over the ranks (missing gradients count as zero).
    Parameters whose id is in `sparse` (the n-gram bag) get their gradient back as a sparse tensor, which
    their optimizer needs; it is reduced dense (every backend can)."""
    if world == 1:
        return
    for p in params:
        if not p.requires_grad:
            continue
        g = torch.zeros_like(p) if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad)
        dist.all_reduce(g)
        g /= world
        p.grad = g.to_sparse() if id(p) in sparse else g
