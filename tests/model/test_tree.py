import json

import pytest
import torch

from medusa_toolkit import MedusaTree, TreeError
from medusa_toolkit.model.tree import MC_SIM_7B_63


def test_buffers_of_a_small_tree_by_hand():
    tree = MedusaTree.from_paths([[0], [1], [0, 0], [0, 1]])
    b = tree.buffers()
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1)
    expected_mask = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(b.attn_mask, expected_mask)
    assert b.position_offsets.tolist() == [0, 1, 1, 2, 2]
    assert b.tree_indices.tolist() == [0, 1, 2, 3, 4]  # top_k inferred as 2
    assert b.retrieve_indices.tolist() == [[0, 2, 0], [0, 1, 3], [0, 1, 4]]
    assert b.path_lengths.tolist() == [2, 3, 3]
    assert tree.num_nodes == 5 and tree.depth == 2 and tree.top_k == 2


def test_tree_indices_follow_top_k():
    tree = MedusaTree.from_paths([[0], [2], [2, 1]], top_k=3)
    # sorted: (0,), (2,), (2, 1); node token index = 1 + (depth-1)*top_k + last rank
    assert tree.buffers().tree_indices.tolist() == [0, 1, 3, 1 + 3 + 1]
    assert tree.leaves == [(0,), (2, 1)]


def test_presets():
    mc = MedusaTree.preset("mc_sim_7b_63")
    assert len(mc) == 63 and mc.num_nodes == 64 and mc.depth == 4 and mc.top_k == 10
    assert sorted(map(tuple, MC_SIM_7B_63)) == sorted(mc.paths)
    chain = MedusaTree.preset("chain-3")
    assert chain.paths == [(0,), (0, 0), (0, 0, 0)]
    assert chain.buffers().retrieve_indices.tolist() == [[0, 1, 2, 3]]
    assert MedusaTree.preset("chain-0").num_nodes == 1


@pytest.mark.parametrize(
    "paths, num_heads, top_k, message",
    [
        ([[0], [0, 1], [0, 1]], None, None, "appears twice"),
        ([[0], [1, 0]], None, None, "not prefix-closed"),
        ([[0], [0, 0], [0, 0, 0]], 2, None, "only 2 heads"),
        ([[0], [5]], None, 4, "only the top-4"),
        ([[0], [-1]], None, None, "non-negative"),
        ([[]], None, None, "non-empty"),
        ("[[0]]", None, None, "list of paths"),
    ],
)
def test_invalid_trees_are_rejected(paths, num_heads, top_k, message):
    with pytest.raises(TreeError, match=message):
        MedusaTree.from_paths(paths, num_heads=num_heads, top_k=top_k)


def test_unknown_preset_and_depth_vs_heads():
    with pytest.raises(TreeError, match="unknown tree preset 'mc_sim'"):
        MedusaTree.preset("mc_sim")
    with pytest.raises(TreeError, match="depth 4 but the heads number 3"):
        MedusaTree.resolve("mc_sim_7b_63", num_heads=3)


def test_tree_json_round_trip(tmp_path):
    tree = MedusaTree.from_paths([[0], [1], [0, 0]], top_k=4, name="tuned", metadata={"predicted_accept_length": 2.5})
    path = tree.save(tmp_path / "tree.json")
    loaded = MedusaTree.from_file(path)
    assert loaded.paths == tree.paths and loaded.top_k == 4 and loaded.metadata["predicted_accept_length"] == 2.5
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([[0], [0, 0]]))
    assert MedusaTree.resolve(str(bare), num_heads=2).paths == [(0,), (0, 0)]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TreeError, match="not valid JSON"):
        MedusaTree.from_file(tmp_path / "bad.json")
