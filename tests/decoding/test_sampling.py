"""Lossless tree speculative sampling: the output law must be the base's, and the check must catch biased samplers.

Statistical tests are seeded, hence deterministic. With fresh seeds, a lossless sampler would fail a check with
probability <= ALPHA = 0.001 (Bonferroni-combined chi-square tests); the biased samplers below fail with p-values
below 1e-20, far past any seed's luck.
"""

import pytest
import torch
from scipy import stats

from medusa_toolkit.decoding import sampling as sampling_mod
from medusa_toolkit.decoding.sampling import accept_lossless, logits_processor, medusa_sample, probabilities
from medusa_toolkit.testing.tiny import fitted
from medusa_toolkit.verify.sampling_check import check_sampling, parse_sampling_spec

ALPHA = 0.001
TREE = [[0], [1], [0, 0], [0, 1], [1, 0]]  # depth 2, two children at the root: exercises the residual update
SAMPLES = 300


@pytest.fixture(scope="module")
def setup():
    """A 48-token model (a small vocabulary gives chi-square tests power) with a peaked-enough distribution."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save
    model, corpus = fitted("llama", seed=2, num_heads=2, steps=60, lm_head_scale=6.0, vocab=48)
    yield model, [corpus[0, :6], corpus[1, :5]]
    torch.set_num_threads(threads)


def test_single_node_rejection_sampling_is_exact():
    """accept_lossless at a root with 3 i.i.d. children from q: the emitted token's law is p (goodness of fit)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.3, 0.0, 0.15, 0.1])
    q = torch.tensor([[0.5, 0.05, 0.1, 0.2, 0.05, 0.1]])  # disagrees with p, even on its support
    children, depth_of = ((1, 2, 3), (), (), ()), [0, 1, 1, 1]
    n, counts, accepted = 12000, torch.zeros(6), 0
    for _ in range(n):
        kids = torch.multinomial(q[0], 3, replacement=True, generator=g).tolist()
        nodes, bonus = accept_lossless([0, *kids], p[None].expand(4, -1), q, children, depth_of, g)
        token = kids[nodes[1] - 1] if len(nodes) > 1 else bonus
        counts[token] += 1
        accepted += len(nodes) > 1
    assert counts[3] == 0  # p(3) = 0: never emitted although q proposes it often
    support = p > 0
    _, p_value = stats.chisquare(counts[support].numpy(), (n * p[support]).numpy())
    assert p_value > ALPHA
    assert 0.3 * n < accepted < n  # candidates really were accepted and rejected


def test_top_k_1_is_greedy(setup):
    """top_k=1 makes p one-hot: lossless sampling must reproduce greedy decoding exactly, for any seed."""
    model, prompts = setup
    g = torch.Generator().manual_seed(3)
    for ids in prompts:
        out = medusa_sample(model, ids, 24, tree=TREE, top_k=1, generator=g, eos_token_id=[])
        want = model.base.generate(ids[None], do_sample=False, max_new_tokens=24, eos_token_id=None)
        assert torch.equal(out.sequences, want)
        assert out.mean_accept_length > 1.2


def test_lossless_sampler_passes(setup):
    model, prompts = setup
    report = check_sampling(
        model, prompts, {"temperature": 0.8, "top_p": 0.95}, SAMPLES, num_tokens=3, alpha=ALPHA, tree=TREE,
        progress=False,
    )  # fmt: skip
    assert report.passed, report.summary()
    assert report.tests["token2"]["dof"] > 10 and report.tests["token3"]["dof"] > 10  # the test had cells to compare


def _first_candidate_always(tree_tokens, p, q, children, depth_of, generator):
    """A deliberately biased rule: accept the first child at every level, bonus from p at the leaf."""
    node, nodes = 0, [0]
    while children[node]:
        node = children[node][0]
        nodes.append(node)
    return nodes, int(torch.multinomial(p[node], 1, generator=generator))


def test_check_catches_biased_sampler(setup, monkeypatch):
    model, prompts = setup
    monkeypatch.setattr(sampling_mod, "accept_lossless", _first_candidate_always)
    report = check_sampling(
        model, prompts, {"temperature": 0.8, "top_p": 0.95}, SAMPLES, num_tokens=3, alpha=ALPHA, tree=TREE,
        progress=False,
    )  # fmt: skip
    assert not report.passed and report.p_value < 1e-20, report.summary()


def test_check_catches_missing_residual_update(setup, monkeypatch):
    """A subtler bug: after a rejection, the next sibling is tested against p instead of norm((p - q)+)."""
    model, prompts = setup
    monkeypatch.setattr(sampling_mod, "_residual", lambda r, q: r)
    report = check_sampling(
        model, prompts, {"temperature": 0.8, "top_p": 0.95}, SAMPLES, num_tokens=3, alpha=ALPHA, tree=TREE,
        progress=False,
    )  # fmt: skip
    assert not report.passed, report.summary()


def test_check_catches_typical_acceptance_at_high_temperature(setup):
    model, prompts = setup
    report = check_sampling(
        model, prompts, {"temperature": 2.0}, SAMPLES, num_tokens=3, alpha=ALPHA, tree=TREE, acceptance="typical",
        progress=False,
    )  # fmt: skip
    assert not report.passed and report.p_value < 1e-20, report.summary()


def test_spec_parsing_and_bad_input(setup):
    assert parse_sampling_spec("temperature=0.8, top_p=0.95,top_k=5") == {"temperature": 0.8, "top_p": 0.95, "top_k": 5}
    with pytest.raises(ValueError, match="keys temperature, top_p, top_k"):
        parse_sampling_spec("temp=0.8")
    with pytest.raises(ValueError, match="top_p must be in"):
        parse_sampling_spec("top_p=1.5")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logits_processor(temperature=0)
    model, prompts = setup
    with pytest.raises(ValueError, match="acceptance"):
        medusa_sample(model, prompts[0], 4, acceptance="greedy")
    p = probabilities(torch.tensor([[1.0, 2.0, 3.0]]), logits_processor(top_k=2))
    assert p[0, 0] == 0 and torch.allclose(p.sum(), torch.tensor(1.0))
