"""The data artefact (RUN/data): what the data stage writes and what training and tree tuning read, in one place.

The stage writes ONE `datasets.Dataset` with `save_to_disk`, a row per sequence:
  input_ids       prompt + response token ids
  loss_mask       1 where the heads are trained (the response; also the prompt with data.train_on_prompt)
  prompt_length   tokens of the rendered prompt
  heldout         True for the held-out rows (a seeded data.eval_fraction share): never trained on; the train stage
                  evaluates on them and the tree stage calibrates on them
  source, ...     where the prompt came from, and what else the stage records (labels: the base's token per position)

`medusa-tune-tree --data DIR` also reads data made elsewhere: a `DatasetDict` saved with `save_to_disk` that has one
of the held-out split names below (its `train` split as training rows); a Dataset without a `heldout` column is all
training rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_toolkit.errors import ToolkitError

HELDOUT = "heldout"  # the column
HELDOUT_SPLITS = ("eval", "validation", "test", "heldout")  # split names of data made elsewhere


class DataArtefactError(ToolkitError, ValueError):
    """A data folder cannot be read as training data; the message names the folder and the fix."""


@dataclass
class DataArtefact:
    """A data folder's rows: `train` and `heldout` Datasets, and where each came from (for logs and tree.json)."""

    train: Any
    heldout: Any
    where: str
    heldout_where: str


def save(ds: Any, heldout: list[bool], out_dir: str | Path) -> Any:
    """Write the stage's format: `ds` plus the `heldout` column, saved to `out_dir`. Returns what was saved."""
    ds = ds.add_column(HELDOUT, list(heldout))
    ds.save_to_disk(str(out_dir))
    return ds


def _load_from_disk(path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataArtefactError(
            f"{path} holds no dataset saved with save_to_disk (columns input_ids, loss_mask); run the data stage "
            "(medusa-train CONFIG --stages data) or point at such a folder"
        ) from None
    except IndexError:  # datasets cannot reload a saved dataset with zero rows (no shards)
        raise DataArtefactError(f"{path} holds a dataset with no rows: nothing to train or calibrate on") from None


def _empty_like(ds: Any) -> Any:
    return ds.select([])


def load(path: str | Path) -> DataArtefact:
    """The training and held-out rows of a data folder (the stage's format, or data made elsewhere: module doc)."""
    path = Path(path)
    if not path.is_dir():
        raise DataArtefactError(
            f"no data artefact in {path}; run the 'data' stage first (medusa-train CONFIG --stages data)"
        )
    for split in HELDOUT_SPLITS:  # a DatasetDict saved with save_to_disk: one sub-folder per split
        if (path / split / "state.json").is_file():
            heldout = _load_from_disk(path / split)
            train = _load_from_disk(path / "train") if (path / "train" / "state.json").is_file() else None
            return _checked(train if train is not None else _empty_like(heldout), heldout, f"{path}/train",
                            f"{path}/{split}")  # fmt: skip
    loaded = _load_from_disk(path)
    if HELDOUT in loaded.column_names:  # the data stage's own format
        flags = loaded[HELDOUT]
        train = loaded.select([i for i, h in enumerate(flags) if not h])
        heldout = loaded.select([i for i, h in enumerate(flags) if h])
        return _checked(train, heldout, f"{path} (training rows)", f"{path} (held-out rows)")
    return _checked(loaded, _empty_like(loaded), str(path), f"{path} (no held-out rows)")


def _checked(train: Any, heldout: Any, where: str, heldout_where: str) -> DataArtefact:
    for ds, name in ((train, where), (heldout, heldout_where)):
        if len(ds) and "input_ids" not in ds.column_names:
            raise DataArtefactError(f"{name} has no input_ids column (columns: {', '.join(ds.column_names)})")
    return DataArtefact(train, heldout, where, heldout_where)


def token_rows(ds: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(input ids, loss masks) of every row; rows without a loss_mask column are trained whole."""
    ids = [list(x) for x in ds["input_ids"]]
    masks = [list(m) for m in ds["loss_mask"]] if "loss_mask" in ds.column_names else [[1] * len(x) for x in ids]
    return ids, masks
