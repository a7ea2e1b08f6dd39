"""Random tree masks: the one generator behind the kernel tests, the attention tests and the GPU check.

A tree mask is what `flash_decode` and the `medusa_tree_decoding` attention take for a step's tree tokens: row i says
which tree tokens node i attends to, i.e. itself and its ancestors.
"""

from __future__ import annotations

import torch


def random_tree_mask(num_nodes: int, generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
    """A random valid tree mask [T, T] (bool, CPU): node i > 0 hangs under a random earlier node and sees itself and
    its ancestors. With `batch`, [batch, T, T]: one tree per row, drawn one after the other from `generator`."""
    if batch is not None:
        return torch.stack([random_tree_mask(num_nodes, generator) for _ in range(batch)])
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for i in range(1, num_nodes):
        parent = int(torch.randint(0, i, (1,), generator=generator))
        mask[i] |= mask[parent]
    return mask


def tree_depths(mask: torch.Tensor) -> torch.Tensor:
    """Each node's depth (how many ancestors it has) in a tree mask [..., T, T]: its position offset in the tree."""
    return mask.sum(-1) - 1
