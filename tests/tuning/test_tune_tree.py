"""Tree tuning: optimal trees on synthetic tables, calibration counting, prediction vs measurement, the stage."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import pytest
import torch

from medusa_toolkit import MedusaHeads, MedusaTree, data_artefact
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.model.heads import HeadsLoadError
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.testing.tiny import fitted, save_model_dir
from medusa_toolkit.tuning import TuneError
from medusa_toolkit.tuning.calibration import Calibration, CalibrationError, calibrate_sequences, count_paths
from medusa_toolkit.tuning.evaluate import comparison_trees, validate
from medusa_toolkit.tuning.inputs import resolve_depth
from medusa_toolkit.tuning.search import accept_length_curve, greedy_order, tree_for_budget
from medusa_toolkit.tuning.stage import run_tree
from medusa_toolkit.tuning.tune import choose_tree

# ----------------------------------------------------------------------------------------------------------------------
# Synthetic tables


def synthetic(rows: int, depth: int, k: int, seed: int) -> tuple[Calibration, torch.Tensor]:
    """A calibration from random rank vectors (rank k = miss), skewed towards low ranks like real heads; few rows
    so that many counts tie."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([2.0**-r for r in range(k)] + [0.6])
    ranks = torch.multinomial(weights, rows * depth, replacement=True, generator=g).view(rows, depth)
    counts, rank_counts = count_paths(ranks, k)
    return Calibration(counts, rank_counts, rows, rows, depth, k), ranks


def all_paths(depth: int, k: int) -> list[tuple[int, ...]]:
    return [p for d in range(1, depth + 1) for p in itertools.product(range(k), repeat=d)]


def brute_force_best(calib: Calibration, m: int) -> int:
    """Max total count over EVERY prefix-closed set of exactly m paths drawn from all k^1 + ... + k^depth paths
    (zero-count paths included), found by trying every m-subset."""
    universe = all_paths(calib.depth, calib.top_k)
    best = -1
    for subset in itertools.combinations(universe, m):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
            best = max(best, sum(calib.path_counts.get(p, 0) for p in chosen))
    return best


def test_count_paths_matches_definition():
    calib, ranks = synthetic(rows=40, depth=3, k=3, seed=1)
    for path in all_paths(3, 3):
        # node accepted at a position iff its whole path equals the prefix of the position's rank vector
        direct = sum(all(int(row[i]) == r for i, r in enumerate(path)) for row in ranks)
        assert calib.path_counts.get(path, 0) == direct, path
    for i in range(3):
        assert calib.rank_counts[i] == [int((ranks[:, i] == r).sum()) for r in range(3)]


@pytest.mark.parametrize(("depth", "k", "max_m"), [(3, 2, 6), (2, 3, 6), (3, 3, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_brute_force(depth, k, max_m, seed):
    calib, _ = synthetic(rows=12, depth=depth, k=k, seed=seed)
    order = greedy_order(calib)
    for m in range(1, max_m + 1):
        chosen = order[:m]
        assert sum(calib.path_counts[p] for p in chosen) == brute_force_best(calib, m), (m, chosen)


@pytest.mark.parametrize("seed", range(5))
def test_tree_always_valid(seed):
    rnd = random.Random(seed)
    depth, k = rnd.randint(1, 5), rnd.randint(1, 10)
    calib, _ = synthetic(rows=rnd.randint(1, 300), depth=depth, k=k, seed=seed)
    order = greedy_order(calib)
    curve = accept_length_curve(calib, order, 80)
    assert curve[0] == 1.0 and all(b >= a for a, b in zip(curve, curve[1:]))
    for n in range(1, 81):
        tree = tree_for_budget(order, n)
        MedusaTree.from_paths([list(p) for p in tree.paths], num_heads=depth, top_k=k)  # prefix-closed, ranks < k
        assert tree.num_nodes <= n and tree.depth <= depth
        assert calib.expected_accept_length(tree.paths) == pytest.approx(curve[n - 1])


def test_acceptance_objective_needs_no_timing():
    calib, _ = synthetic(rows=50, depth=3, k=4, seed=3)
    result = choose_tree(None, calib, max_nodes=10, objective="acceptance")  # no model: nothing is timed
    assert result.tree.num_nodes == 10 and result.step_time is None
    assert result.predicted_accept_length == pytest.approx(calib.expected_accept_length(greedy_order(calib)[:9]))
    with pytest.raises(TuneError, match="objective"):
        choose_tree(None, calib, objective="fast")


def test_presets_compared_only_when_they_fit():
    tuned = MedusaTree.from_paths([[0], [0, 0]])
    trees, notes = comparison_trees(tuned, num_heads=2)
    assert set(trees) == {"tuned", "chain-2"} and "mc_sim_7b_63 skipped" in notes[0]
    trees, notes = comparison_trees(tuned, num_heads=5)
    assert set(trees) == {"tuned", "mc_sim_7b_63", "chain-5"} and not notes


# ----------------------------------------------------------------------------------------------------------------------
# A tiny model with trained heads


@pytest.fixture(scope="module")
def tiny():
    return fitted("llama", seed=0, steps=100)


def test_predicted_accept_length_matches_measured(tiny):
    """Calibrate on 8 rows of the heads' own distribution (the base's greedy text from the fit_heads prompts), then
    decode prompts from 6 other rows: measured mean accepted length within 0.5 tokens of the prediction."""
    model, corpus = tiny
    calib = calibrate_sequences(model, list(corpus[:8]), [4] * 8, depth=4, top_k=10, progress=False)
    # positions t = 3 (last prompt token) .. T - 4 - 2 (needs tokens up to t + depth + 1)
    assert calib.num_positions == 8 * (corpus.shape[1] - 4 - 2 - 3 + 1) and calib.dropped_positions == 0
    result = choose_tree(model, calib, max_nodes=24, objective="acceptance")
    prompts = [row[:6].tolist() for row in corpus[8:14]]
    measured = validate(model, {"tuned": result.tree}, prompts, max_new_tokens=32, progress=False)
    assert measured["tuned"]["identical_to_greedy"]
    assert result.predicted_accept_length > 2.0  # the heads really help, so the check is not trivial
    assert measured["tuned"]["mean_accept_length"] == pytest.approx(result.predicted_accept_length, abs=0.5)


def test_speed_objective_times_budgets(tiny):
    model, corpus = tiny
    calib = calibrate_sequences(model, list(corpus[:4]), [4] * 4, depth=2, top_k=4, progress=False)
    result = choose_tree(model, calib, max_nodes=8, prefix_length=16, repeats=1, grid=(1, 4, 8), progress=False)
    top = min(8, len(greedy_order(calib)) + 1)
    assert sorted(result.measured_latency) == sorted({1, 4, top} & set(range(1, top + 1)))
    assert all(t > 0 for t in result.step_time) and len(result.step_time) == top
    tps = result.tokens_per_second
    assert tps[result.chosen_nodes - 1] == max(tps) and result.tree.num_nodes == result.chosen_nodes


def test_bad_calibration_inputs(tiny):
    model, corpus = tiny
    with pytest.raises(CalibrationError, match="no calibration sequences"):
        calibrate_sequences(model, [], [], depth=2, top_k=4, progress=False)
    with pytest.raises(CalibrationError, match="no usable calibration positions"):
        calibrate_sequences(model, [corpus[0, :6]], [4], depth=4, top_k=4, progress=False)  # too short
    with pytest.raises(CalibrationError, match="not greedy"):  # random text is not the base's greedy output
        calibrate_sequences(model, [torch.randint(0, 256, (40,))], [1], depth=2, top_k=4, progress=False)
    with pytest.raises(CalibrationError, match="exceeds the 4 heads"):
        calibrate_sequences(model, list(corpus[:1]), [4], depth=5, top_k=4, progress=False)
    with pytest.raises(TuneError, match="between 1 and the number of heads"):
        resolve_depth(6, 4)


# ----------------------------------------------------------------------------------------------------------------------
# The stage


def _fake_run(tmp_path, model, corpus, heads=None):
    import datasets

    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    save_model_dir(model.base, base_dir)
    (heads or model.heads).save_pretrained(run_dir / "heads")
    rows = [row.tolist() for row in corpus]
    masks = [[0] * 4 + [1] * (len(r) - 4) for r in rows]
    # The data stage's format (the fitted base's vocabulary has no byte tokenizer, so its text is the greedy corpus).
    data = datasets.Dataset.from_dict({"input_ids": rows, "loss_mask": masks})
    data_artefact.save(data, [i >= 8 for i in range(len(rows))], run_dir / "data")
    cfg = config_from_dict({
        "model": {"name_or_path": str(base_dir), "device": "cpu"},
        "tree": {"max_nodes": 16, "num_calibration_prompts": 5, "num_validation_prompts": 2, "prefix_length": 16,
                 "calibration_max_new_tokens": 16, "latency_repeats": 1},
        "logging": {"progress": False},
    })  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    return cfg, run_dir, out


def test_stage_writes_tree_and_plots(tiny, tmp_path):
    model, corpus = tiny
    cfg, run_dir, out = _fake_run(tmp_path, model, corpus)
    run_tree(StageRun.prepare(cfg, run_dir, "tree", out))
    for name in ("tree.json", "acceptance_heatmap.png", "tree.png", "budget_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    tree = MedusaTree.from_file(out / "tree.json")
    record = json.loads((out / "tree.json").read_text())
    assert 1 <= tree.num_nodes <= 16 and tree.depth <= 4
    assert record["calibration"]["num_sequences"] == 5 and "data (held-out rows)" in record["calibration"]["source"]
    assert tree.metadata["device"]["name"] and len(record["latency"]["step_time_s"]) == len(record["curve"]["nodes"])
    assert len(record["acceptance"]["head_rank_accuracy"]) == 4
    results = record["validation"]["results"]
    assert set(results) == {"base_greedy", "tuned", "mc_sim_7b_63", "chain-4"}
    assert all(r["identical_to_greedy"] for r in results.values())


def test_tuner_falls_back_to_the_one_node_tree_when_no_tree_pays(tiny, tmp_path, monkeypatch):
    """A tuned tree that decodes slower than base greedy on the validation prompts is never shipped: tree.json holds
    the 1-node tree, says why, and predicts what that tree does (one token per step)."""
    from medusa_toolkit.tuning import tune

    model, corpus = tiny
    cfg, run_dir, out = _fake_run(tmp_path, model, corpus)
    real = tune.validate

    def slow(*args, **kwargs):
        results = real(*args, **kwargs)
        results["tuned"]["speedup_vs_base"] = 0.8  # as if this machine verified trees slowly
        return results

    monkeypatch.setattr(tune, "validate", slow)
    run_tree(StageRun.prepare(cfg, run_dir, "tree", out))
    record = json.loads((out / "tree.json").read_text())
    tree = MedusaTree.from_file(out / "tree.json")
    assert tree.num_nodes == 1 and record["num_nodes"] == 1 and record["paths"] == []
    assert "no tree paid" in record["fallback"] and record["validation"]["notes"][-1] == record["fallback"]
    assert record["predicted_accept_length"] == 1.0


def test_stage_rejects_heads_for_another_base(tiny, tmp_path):
    model, corpus = tiny
    wrong = MedusaHeads(hidden_size=32, vocab_size=256, num_heads=2)
    cfg, run_dir, out = _fake_run(tmp_path, model, corpus, heads=wrong)
    with pytest.raises(HeadsLoadError, match="do not fit this base"):
        run_tree(StageRun.prepare(cfg, run_dir, "tree", out))


def test_tune_tree_data_flag_reads_data_made_elsewhere(tiny, tmp_path):
    """`medusa-tune-tree --data DIR` takes a DatasetDict with an eval split (data made outside the toolkit); an empty
    one is an error that says so, not a silent switch to prompts."""
    import datasets

    from medusa_toolkit.tuning.inputs import calibration_rows

    model, corpus = tiny
    rows = [row.tolist() for row in corpus]
    masks = [[0] * 4 + [1] * (len(r) - 4) for r in rows]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"input_ids": rows[:8], "loss_mask": masks[:8]}),
        "eval": datasets.Dataset.from_dict({"input_ids": rows[8:], "loss_mask": masks[8:]}),
    }).save_to_disk(str(tmp_path / "theirs"))  # fmt: skip
    (seqs, _, where), why_not = calibration_rows(tmp_path / "theirs", allow_train=True)
    assert seqs == rows[8:] and where.endswith("/eval") and why_not == ""
    empty = datasets.Dataset.from_dict({"input_ids": [[1]], "loss_mask": [[1]]}).select([])
    datasets.DatasetDict({"eval": empty}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(data_artefact.DataArtefactError, match="no rows"):
        calibration_rows(tmp_path / "empty", allow_train=True)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """A run whose data artefact the data stage itself wrote (tiny byte-level model, builtin prompts), plus heads."""
    from medusa_toolkit.pipeline.stages import run_pipeline
    from medusa_toolkit.testing.runs import base_config
    from medusa_toolkit.testing.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("staged")
    model_dir = tiny_model_dir(root / "model")
    raw = base_config(model_dir)
    raw["tree"] = {"max_nodes": 4, "num_calibration_prompts": 4, "num_validation_prompts": 0, "prefix_length": 16,
                   "calibration_max_new_tokens": 8, "latency_repeats": 1}  # fmt: skip
    raw["data"]["eval_fraction"] = 0.5
    cfg = config_from_dict(raw)
    run_pipeline(cfg, root / "run", ["data"])
    MedusaHeads(64, 258, num_heads=2).save_pretrained(root / "run" / "heads")
    return cfg, root / "run"


def test_tree_stage_calibrates_on_the_data_stages_heldout_rows(staged_run, tmp_path, capsys):
    """Under the default tree.calibrate_on: data, the tree stage calibrates on the held-out rows of the artefact the
    data stage wrote (one Dataset with a heldout column), and says so in its log and in tree.json."""
    cfg, run_dir = staged_run
    heldout = data_artefact.load(run_dir / "data").heldout
    assert len(heldout) >= 2
    run_tree(StageRun.prepare(cfg, run_dir, "tree", tmp_path))
    record = json.loads((tmp_path / "tree.json").read_text())
    assert "held-out rows" in record["calibration"]["source"]
    assert record["calibration"]["num_sequences"] == min(4, len(heldout))
    assert "tree: calibrating on data rows" in capsys.readouterr().out


def test_tree_stage_without_heldout_rows_falls_back_to_prompts_and_says_so(staged_run, tmp_path, capsys):
    """A data artefact with no held-out rows (data.eval_fraction: 0) calibrates on tree.prompts: logged, recorded."""
    import datasets

    cfg, run_dir = staged_run
    run = tmp_path / "run"
    shutil.copytree(run_dir / "heads", run / "heads")
    ds = datasets.load_from_disk(str(run_dir / "data")).remove_columns("heldout")
    data_artefact.save(ds, [False] * len(ds), run / "data")
    cfg = config_from_dict({**cfg.to_dict(), "tree": {**cfg.to_dict()["tree"], "prompts": "eval"}})
    out = tmp_path / "out"
    out.mkdir()
    run_tree(StageRun.prepare(cfg, run, "tree", out))
    record = json.loads((out / "tree.json").read_text())
    assert record["calibration"]["source"].startswith("eval prompts")
    assert "no held-out rows" in record["calibration"]["source"]
    assert "calibrating on tree.prompts (eval) instead" in capsys.readouterr().out


def test_calibration_on_eval_prompts_never_overlaps_the_validation_prompts(tiny, tmp_path, monkeypatch):
    """calibrate_on: prompts ignores the data rows; with eval prompts for both, calibration takes the eval prompts
    after the validation ones, so the tree is checked on prompts it was not fitted to."""
    from medusa_toolkit.tuning import inputs, tune

    model, corpus = tiny
    cfg, run_dir, out = _fake_run(tmp_path, model, corpus)
    cfg = config_from_dict({**cfg.to_dict(), "tree": {**cfg.to_dict()["tree"], "calibrate_on": "prompts",
                                                      "prompts": "eval", "validation_prompts": "eval"}})  # fmt: skip
    seen = {}
    real_calibrate, real_validate = inputs.calibrate_prompts, tune.validate

    def calibrate(model, prompts, *args, **kwargs):
        seen["calibration"] = prompts
        return real_calibrate(model, prompts, *args, **kwargs)

    def validate(model, trees, prompts, *args, **kwargs):
        seen["validation"] = prompts
        return real_validate(model, trees, prompts, *args, **kwargs)

    monkeypatch.setattr(inputs, "calibrate_prompts", calibrate)
    monkeypatch.setattr(tune, "validate", validate)
    monkeypatch.setattr(inputs, "calibrate_sequences", lambda *a, **k: pytest.fail("calibrated on data rows"))
    run_tree(StageRun.prepare(cfg, run_dir, "tree", out))
    record = json.loads((out / "tree.json").read_text())
    assert record["calibration"]["source"].startswith("eval prompts")
    assert len(seen["calibration"]) == 5 and len(seen["validation"]) == 2
    assert not {tuple(p) for p in seen["calibration"]} & {tuple(p) for p in seen["validation"]}
