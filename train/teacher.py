"""The teacher: the frozen base's last hidden states for a batch, optionally cached per sequence so that later epochs
and evaluations skip the base's forward (train.teacher_cache: memory, or disk under RUN/teacher_cache)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from medusa_toolkit import distributed as D
from medusa_toolkit.digest import digest_of
from medusa_toolkit.pipeline.stages import StageRun


class Teacher:
    """The frozen base's last hidden states for a batch, optionally cached per sequence (later epochs skip the base).

    cache: False, "memory" (a dict in this process) or "disk" (`DiskCache`: memory-mapped files under the run dir,
    written once, reused across epochs and --resume). Whether a batch skips the base is decided by all ranks together:
    under ZeRO-3 the base's forward is a collective, so one rank skipping it alone would hang the others.
    """

    def __init__(self, base, cache=False, disk: DiskCache | None = None):
        self.base, self.decoder = base, base.get_decoder()
        self.cache: dict[int, torch.Tensor] | None = {} if cache == "memory" else None
        self.disk = disk
        self.hits = self.misses = 0
        self.hit_s = self.miss_s = 0.0

    def _has(self, i: int) -> bool:
        return (self.cache is not None and i in self.cache) or (self.disk is not None and self.disk.has(i))

    def _get(self, i: int) -> torch.Tensor:
        return self.cache[i] if self.cache is not None else self.disk.get(i)

    @torch.no_grad()
    def __call__(self, indices: list[int], ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        caching = self.cache is not None or self.disk is not None
        if caching and D.all_true(all(self._has(i) for i in indices)):
            hidden = ids.new_zeros((*ids.shape, self.base.config.hidden_size), dtype=self.base.dtype)
            for row, i in enumerate(indices):
                h = self._get(i)[: ids.shape[1]]
                hidden[row, : h.shape[0]] = h.to(hidden.device)
            self.hits += 1
            self.hit_s += time.perf_counter() - start
            return hidden
        hidden = self.decoder(input_ids=ids).last_hidden_state
        for row, (i, n) in enumerate(zip(indices, lengths)):
            if self.cache is not None and i not in self.cache:
                self.cache[i] = hidden[row, :n].clone()
            elif self.disk is not None and not self.disk.has(i):
                self.disk.put(i, hidden[row, :n])
        if caching:
            self.misses += 1
            self.miss_s += time.perf_counter() - start
        return hidden

    def report(self) -> dict:
        """What the cache did this run (for training_summary.json)."""
        out = {"batches_from_cache": self.hits, "batches_through_base": self.misses}
        if self.hits and self.misses:
            hit, miss = self.hit_s / self.hits, self.miss_s / self.misses
            out.update(s_per_batch_cached=hit, s_per_batch_base=miss, teacher_speedup=miss / max(hit, 1e-9))
        if self.disk is not None:
            out.update(path=str(self.disk.root), bytes=self.disk.nbytes(), sequences_cached=self.disk.count())
        return out


class DiskCache:
    """Last hidden states of every sequence (train, then held-out), memory-mapped from one file under the run dir.

    Layout of `root`: `meta.json` (`teacher_key`: the data and the base; dtype, hidden size, per-sequence lengths),
    `hidden.bin` (all sequences' rows back to back, [sum(lengths), hidden] in the base's dtype) and `written.bin`
    (one byte per sequence, set after its rows). Any rank writes the sequences it computed (disjoint regions of a
    shared file; the run dir must be shared between nodes, as for checkpoints). Another hash, dtype or geometry:
    rank 0 rebuilds it empty.
    """

    def __init__(self, root: Path, key: str, lengths: list[int], hidden_size: int, dtype: torch.dtype):
        self.root = Path(root)
        self.lengths = lengths
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        meta = {"key": key, "dtype": str(dtype), "hidden_size": hidden_size, "lengths_sha": digest_of(lengths)[:16]}
        if D.is_main():
            try:
                same = json.loads((self.root / "meta.json").read_text()) == meta
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root.mkdir(parents=True)
                elem = torch.empty((), dtype=dtype).element_size()
                with open(self.root / "hidden.bin", "wb") as f:
                    f.truncate(max(1, self.offsets[-1] * hidden_size * elem))
                with open(self.root / "written.bin", "wb") as f:
                    f.truncate(max(1, len(lengths)))
                (self.root / "meta.json").write_text(json.dumps(meta) + "\n")
        D.barrier()
        numel = max(1, self.offsets[-1] * hidden_size)
        self.data = torch.from_file(str(self.root / "hidden.bin"), shared=True, size=numel, dtype=dtype)
        self.written = torch.from_file(str(self.root / "written.bin"), shared=True, size=max(1, len(lengths)),
                                       dtype=torch.uint8)  # fmt: skip
        self.hidden_size = hidden_size

    def _rows(self, i: int) -> torch.Tensor:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.data[a * self.hidden_size : b * self.hidden_size].view(b - a, self.hidden_size)

    def has(self, i: int) -> bool:
        return bool(self.written[i])

    def get(self, i: int) -> torch.Tensor:
        return self._rows(i)

    def put(self, i: int, hidden: torch.Tensor) -> None:
        self._rows(i).copy_(hidden.detach().to("cpu", self.data.dtype))
        self.written[i] = 1  # after the rows: a reader never sees the flag before the data

    def count(self) -> int:
        return int(self.written.sum())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir())


def teacher_key(run: StageRun) -> str:
    """What the base's hidden states depend on: the data artefact's content and the base (weights, dtype, attention).
    Learning rate, epochs or heads do not change them, so a sweep over those reuses the on-disk cache."""
    m = run.cfg.model
    return digest_of(
        {"data": run.inputs["upstream"]["data"], "base": run.inputs["base_model"], "dtype": m.dtype,
         "attn": m.attn_implementation}
    )[:16]  # fmt: skip


def make_teacher(run: StageRun, base, train_ds, eval_ds) -> Teacher:
    """The Teacher for train.teacher_cache; disk: sequence lengths cut to max_seq_len, as `collate` cuts them."""
    cfg = run.cfg
    mode = cfg.train.teacher_cache
    if mode != "disk":
        return Teacher(base, mode)
    max_len = cfg.train.max_seq_len
    lengths = [min(len(r["input_ids"]), max_len) for ds in (train_ds, eval_ds) for r in ds]
    disk = DiskCache(run.dirs.teacher_cache, teacher_key(run), lengths, base.config.hidden_size, base.dtype)
    return Teacher(base, False, disk)
