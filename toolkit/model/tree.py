"""Medusa trees: which head candidates one verification step tries, and the index buffers that step needs.

A tree is a list of paths of ranks (upstream's `medusa_choices` format): `[r0, r1]` means "head 0's rank-r0 candidate
followed by head 1's rank-r1 candidate". Node 0 is the root: the base model's own next token, which is always right.
Every other node is one path; a node's token depends only on its depth and last rank, because all heads read the
same hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from medusa_toolkit.errors import ToolkitError

# Upstream Medusa's default tree (medusa_choices.mc_sim_7b_63, 63 paths, depth 4, top-10), kept for comparisons.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1],
    [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0],
    [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0],
    [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1],
    [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
]  # fmt: skip


class TreeError(ToolkitError, ValueError):
    """A tree specification is invalid; the message names the offending path."""


@dataclass(frozen=True)
class TreeBuffers:
    """Index tensors for one verification step over a tree of N nodes (root included) and L root-to-leaf paths.

    attn_mask:         bool [N, N]; node i may attend to node j (the root, its ancestors and itself).
    position_offsets:  long [N]; a node's depth (root 0), added to the prefix length to give its position id.
    tree_indices:      long [N]; where each node's token sits in cat([root_token], head_topk.flatten()).
    retrieve_indices:  long [L, depth + 1]; the node indices along each root-to-leaf path, padded with 0.
    path_lengths:      long [L]; how many entries of each retrieve row are real (root included).
    """

    attn_mask: torch.Tensor
    position_offsets: torch.Tensor
    tree_indices: torch.Tensor
    retrieve_indices: torch.Tensor
    path_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> TreeBuffers:
        return TreeBuffers(*(t.to(device) for t in (
            self.attn_mask, self.position_offsets, self.tree_indices, self.retrieve_indices, self.path_lengths
        )))  # fmt: skip


class MedusaTree:
    """A validated Medusa tree. Build with `from_paths`, `preset`, `from_file` or `resolve`."""

    def __init__(self, paths: list[tuple[int, ...]], top_k: int, name: str | None = None, metadata: dict | None = None):
        self.paths = paths  # sorted by (depth, ranks): parents always come before their children
        self.top_k = top_k
        self.name = name
        self.metadata = metadata or {}
        self._buffers: dict[str, TreeBuffers] = {}

    # ------------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_paths(
        cls,
        paths: list[list[int]] | list[tuple[int, ...]],
        num_heads: int | None = None,
        top_k: int | None = None,
        name: str | None = None,
        metadata: dict | None = None,
    ) -> MedusaTree:
        """Validate `paths` (prefix-closed, no duplicates, depth <= num_heads, ranks < top_k) and build a tree."""
        if not isinstance(paths, (list, tuple)):
            raise TreeError(f"a tree is a list of paths such as [[0], [1], [0, 0]], got {type(paths).__name__}")
        clean: list[tuple[int, ...]] = []
        for p in paths:
            if not isinstance(p, (list, tuple)) or not p:
                raise TreeError(f"tree path {p!r} must be a non-empty list of ranks, e.g. [0, 1]")
            if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p):
                raise TreeError(f"tree path {list(p)} holds a rank that is not a non-negative integer")
            clean.append(tuple(p))
        seen = set()
        for p in clean:
            if p in seen:
                raise TreeError(f"tree path {list(p)} appears twice")
            seen.add(p)
        for p in clean:
            if len(p) > 1 and p[:-1] not in seen:
                raise TreeError(
                    f"tree is not prefix-closed: path {list(p)} needs its parent {list(p[:-1])} in the tree"
                )
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise TreeError(f"a tree's top_k must be a positive integer (candidates per head), got {top_k!r}")
        depth = max((len(p) for p in clean), default=0)
        if num_heads is not None and depth > num_heads:
            deep = next(p for p in clean if len(p) > num_heads)
            raise TreeError(f"tree path {list(deep)} has depth {len(deep)} but there are only {num_heads} heads")
        max_rank = max((max(p) for p in clean), default=0)
        if top_k is None:
            top_k = max_rank + 1
        elif max_rank >= top_k:
            bad = next(p for p in clean if max(p) >= top_k)
            raise TreeError(f"tree path {list(bad)} uses rank {max(bad)} but only the top-{top_k} candidates are drawn")
        return cls(sorted(clean, key=lambda p: (len(p), p)), top_k, name=name, metadata=metadata)

    @classmethod
    def chain(cls, n: int) -> MedusaTree:
        """The top-1 candidate of each of n heads: [[0], [0, 0], ...]."""
        return cls.from_paths([[0] * d for d in range(1, n + 1)], name=f"chain-{n}")

    @classmethod
    def preset(cls, name: str) -> MedusaTree:
        """Named trees: `chain-N` and `mc_sim_7b_63`."""
        if name == "mc_sim_7b_63":
            return cls.from_paths(MC_SIM_7B_63, name=name)
        if name.startswith("chain-") and name[len("chain-") :].isdigit() and int(name[len("chain-") :]) >= 0:
            return cls.chain(int(name[len("chain-") :]))
        raise TreeError(
            f"unknown tree preset {name!r}; presets are 'chain-N' (e.g. chain-4) and 'mc_sim_7b_63', or pass a tree.json path"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> MedusaTree:
        """Load a tree.json: either a bare list of paths or a mapping with a `paths` list (tuned trees)."""
        path = Path(path)
        if not path.is_file():
            raise TreeError(f"tree file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TreeError(f"{path} is not valid JSON: {e}") from None
        if isinstance(data, dict):
            if "paths" not in data:
                raise TreeError(f"{path} has no 'paths' list (the medusa_choices of the tree)")
            meta = {k: v for k, v in data.items() if k != "paths"}
            return cls.from_paths(
                data["paths"], top_k=data.get("top_k"), name=data.get("name", path.stem), metadata=meta
            )
        return cls.from_paths(data, name=path.stem)

    @classmethod
    def resolve(cls, spec: MedusaTree | str | Path | list | None, num_heads: int) -> MedusaTree:
        """A tree from a preset name, a tree.json path, a list of paths, or None (chain over all heads)."""
        if spec is None:
            tree = cls.chain(num_heads)
        elif isinstance(spec, MedusaTree):
            tree = spec
        elif isinstance(spec, (list, tuple)):
            tree = cls.from_paths(spec)
        elif str(spec).endswith(".json") or Path(spec).is_file():
            tree = cls.from_file(spec)
        else:
            tree = cls.preset(str(spec))
        if tree.depth > num_heads:
            raise TreeError(
                f"tree {tree.name or ''} has depth {tree.depth} but the heads number {num_heads}; "
                f"use a shallower tree (e.g. chain-{num_heads}) or heads with more heads"
            )
        return tree

    def to_json(self) -> dict:
        return {"name": self.name, "paths": [list(p) for p in self.paths], "top_k": self.top_k, **self.metadata}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    # ------------------------------------------------------------------------------------------------------------------
    # Shape

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def num_nodes(self) -> int:
        """Tree tokens verified per step, root included."""
        return len(self.paths) + 1

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"MedusaTree(name={self.name!r}, nodes={self.num_nodes}, depth={self.depth}, top_k={self.top_k})"

    @cached_property
    def leaves(self) -> list[tuple[int, ...]]:
        """Paths that are no other path's parent, in node order."""
        parents = {p[:-1] for p in self.paths}
        return [p for p in self.paths if p not in parents]

    # ------------------------------------------------------------------------------------------------------------------
    # Buffers

    def buffers(self, device: torch.device | str = "cpu") -> TreeBuffers:
        """The step's index tensors on `device` (built once per device)."""
        key = str(device)
        if key not in self._buffers:
            self._buffers[key] = self._build_buffers().to(device)
        return self._buffers[key]

    def _build_buffers(self) -> TreeBuffers:
        n = self.num_nodes
        node_of = {p: i + 1 for i, p in enumerate(self.paths)}
        node_of[()] = 0

        attn_mask = torch.zeros(n, n, dtype=torch.bool)
        position_offsets = torch.zeros(n, dtype=torch.long)
        tree_indices = torch.zeros(n, dtype=torch.long)
        for p, i in node_of.items():
            for d in range(len(p) + 1):  # the root, every ancestor, and the node itself
                attn_mask[i, node_of[p[:d]]] = True
            position_offsets[i] = len(p)
            if p:
                tree_indices[i] = 1 + (len(p) - 1) * self.top_k + p[-1]

        leaves = self.leaves if self.paths else [()]
        retrieve = torch.zeros(len(leaves), self.depth + 1, dtype=torch.long)
        lengths = torch.zeros(len(leaves), dtype=torch.long)
        for row, leaf in enumerate(leaves):
            for d in range(len(leaf) + 1):
                retrieve[row, d] = node_of[leaf[:d]]
            lengths[row] = len(leaf) + 1
        return TreeBuffers(attn_mask, position_offsets, tree_indices, retrieve, lengths)


def check_tree_spec(spec: str, key: str, allow_auto: bool = False, num_heads: int | None = None) -> None:
    """Fail fast on a tree config value: `auto` (where allowed), a preset, or a tree.json that loads, no deeper than
    `num_heads` when the heads' number is known (else it is checked once they are loaded)."""
    if allow_auto and spec == "auto":
        return
    try:
        MedusaTree.resolve(spec, num_heads=num_heads if num_heads is not None else 10**6)
    except TreeError as e:
        raise TreeError(f"{key}: {e}") from None


def tree_digest(tree: MedusaTree) -> str:
    """Content hash of what a tree makes decoding do (its paths and top-k), independent of file formatting."""
    import hashlib

    payload = json.dumps({"paths": [list(p) for p in tree.paths], "top_k": tree.top_k})
    return hashlib.sha256(payload.encode()).hexdigest()
