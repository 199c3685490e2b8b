"""Reward plugins: the UME reward against a loop reference, hand cases, format, registry, validation."""

from __future__ import annotations

import pickle

import pytest
import torch

from ume_r1.data.template import assistant_text, format_ok
from ume_r1.reward.batch import RewardBatch
from ume_r1.reward.registry import RewardPluginError, available_rewards, load_reward

GOOD = assistant_text("a red car on a street", "red car")


def make_batch(
    examples: list[tuple[int, int, list[int]]],
    num_prompts: int,
    embeddings: torch.Tensor,
    group: int,
    responses: list[str] | None = None,
) -> RewardBatch:
    """Batch from (query prompt, positive target prompt, explicit negative target prompts) examples.

    Every prompt not used as a query is a target; prompts may be shared (deduplicated targets).
    """
    queries = {q for q, _, _ in examples}
    roles = ["query" if p in queries else "target" for p in range(num_prompts)]
    positives: list[list[int]] = [[] for _ in range(num_prompts)]
    negatives: list[list[int]] = [[] for _ in range(num_prompts)]
    for q, t, negs in examples:
        positives[q].append(t)
        positives[t].append(q)
        negatives[q].extend(negs)
    in_batch = [
        [o for o in range(num_prompts) if roles[o] != roles[p] and o not in positives[p]]
        for p in range(num_prompts)
    ]
    n = num_prompts * group
    return RewardBatch(
        embeddings=embeddings,
        responses=responses if responses is not None else [GOOD] * n,
        prompt_index=torch.arange(num_prompts).repeat_interleave(group),
        has_gen_emb=torch.ones(n, dtype=torch.bool),
        roles=roles,
        positives=positives,
        negatives=negatives,
        in_batch_negatives=in_batch,
    )


def reference_reward(
    batch: RewardBatch,
    mode: str = "ranking_x_gap",
    in_batch_negatives: bool = True,
    symmetric: bool = True,
    threshold: float = 0.5,
    format_weight: float = 1.0,
) -> dict[str, list[float]]:
    """The formula written out per response with plain Python."""
    emb = batch.embeddings.tolist()
    prompt_of = batch.prompt_index.tolist()
    n = len(emb)

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(emb[i], emb[j], strict=True))

    out: dict[str, list[float]] = {k: [] for k in ("reward", "format", "ranking", "gap", "embedding")}
    for i in range(n):
        p = prompt_of[i]
        pos_prompts = set(batch.positives[p])
        neg_prompts = set(batch.negatives[p])
        if in_batch_negatives:
            neg_prompts |= set(batch.in_batch_negatives[p])
        s_pos = [sim(i, j) for j in range(n) if prompt_of[j] in pos_prompts]
        s_neg = [sim(i, j) for j in range(n) if prompt_of[j] in neg_prompts]
        rewarded = len(s_pos) > 0 and (symmetric or batch.roles[p] == "query")
        ranking = gap = 0.0
        if rewarded and s_neg:
            k = len(s_pos)
            # Negatives listed first + stable sort: a tie at the cut-off goes to the negative.
            ranked = sorted([(s, False) for s in s_neg] + [(s, True) for s in s_pos], key=lambda x: -x[0])
            ranking = sum(1 for _, is_pos in ranked[:k] if is_pos) / k
            gap = sum(s_pos) / len(s_pos) - sum(s_neg) / len(s_neg)
        if mode == "ranking_x_gap":
            embedding = ranking * gap
        elif mode == "ranking":
            embedding = ranking
        elif mode == "gap":
            embedding = gap
        else:
            embedding = 1.0 if rewarded and sum(s_pos) / len(s_pos) > threshold else 0.0
        fmt = 1.0 if format_ok(batch.responses[i]) else 0.0
        for key, value in zip(
            out, (format_weight * fmt + embedding, fmt, ranking, gap, embedding), strict=True
        ):
            out[key].append(value)
    return out


def clustered_embeddings(centers: list[int], group: int, dim: int, noise: float, seed: int) -> torch.Tensor:
    """Responses of prompt p lie near center centers[p], so positives are actually similar."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(max(centers) + 1, dim, generator=gen)
    emb = base[torch.tensor(centers)].repeat_interleave(group, 0)
    emb = emb + noise * torch.randn(emb.shape, generator=gen)
    return torch.nn.functional.normalize(emb, dim=1)


# Prompts 0-3 are queries; 4-7 their targets; 8-9 explicit negatives; query 3 shares target 6 with
# query 2 (a deduplicated target with two positives).
EXAMPLES = [(0, 4, [8]), (1, 5, [8, 9]), (2, 6, [9]), (3, 6, [])]
NUM_PROMPTS, GROUP = 10, 4
CENTERS = [0, 1, 2, 2, 0, 1, 2, 3, 4, 5]


@pytest.fixture
def batch() -> RewardBatch:
    emb = clustered_embeddings(CENTERS, GROUP, dim=16, noise=0.6, seed=0)
    responses = [GOOD if i % 3 else "<think>x</think> no answer" for i in range(NUM_PROMPTS * GROUP)]
    return make_batch(EXAMPLES, NUM_PROMPTS, emb, GROUP, responses)


def assert_matches_reference(batch: RewardBatch, **kwargs: object) -> dict[str, torch.Tensor]:
    got = load_reward("ume")(batch, **kwargs)
    want = reference_reward(batch, **kwargs)
    assert set(got) == set(want)
    for key, values in want.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], torch.tensor(values, dtype=torch.float32), atol=1e-5, rtol=0)
    return got


def test_ume_explicit_negatives_only(batch: RewardBatch) -> None:
    got = assert_matches_reference(batch, in_batch_negatives=False)
    # Query 3 and the targets have no explicit negatives: nothing to rank against, no embedding reward.
    assert torch.all(got["embedding"][3 * GROUP :] == 0)
    assert torch.any(got["embedding"][: 3 * GROUP] != 0)


def test_ume_in_batch_negatives(batch: RewardBatch) -> None:
    got = assert_matches_reference(batch)
    assert torch.all(got["ranking"][: 4 * GROUP] > 0)


def test_ume_symmetric_target_side(batch: RewardBatch) -> None:
    got = assert_matches_reference(batch, symmetric=True)
    shared = slice(6 * GROUP, 7 * GROUP)  # target 6 is the positive of queries 2 and 3: k = 2G
    assert batch.positives[6] == [2, 3]
    assert torch.all(got["embedding"][shared] != 0)
    # Explicit-negative targets are nobody's positive: no embedding reward.
    assert torch.all(got["embedding"][8 * GROUP :] == 0)


@pytest.mark.parametrize("mode", ["ranking_x_gap", "ranking", "gap", "threshold"])
@pytest.mark.parametrize("in_batch_negatives", [True, False])
def test_ume_modes(batch: RewardBatch, mode: str, in_batch_negatives: bool) -> None:
    assert_matches_reference(batch, mode=mode, in_batch_negatives=in_batch_negatives, format_weight=0.5)


def test_ume_threshold_mode_is_mixed(batch: RewardBatch) -> None:
    got = assert_matches_reference(batch, mode="threshold", threshold=0.5)
    assert set(got["embedding"].tolist()) == {0.0, 1.0}


def test_ume_asymmetric(batch: RewardBatch) -> None:
    got = assert_matches_reference(batch, symmetric=False)
    assert torch.all(got["embedding"][4 * GROUP :] == 0)
    assert torch.all(got["ranking"][4 * GROUP :] == 0)
    assert torch.any(got["embedding"][: 4 * GROUP] != 0)


def test_ume_random_larger_batch() -> None:
    # Unclustered random embeddings and more prompts: exercises many different rankings.
    examples = [(q, 12 + q, [24 + q % 4, 24 + (q + 1) % 4]) for q in range(12)]
    emb = torch.nn.functional.normalize(
        torch.randn(28 * 3, 8, generator=torch.Generator().manual_seed(1)), dim=1
    )
    b = make_batch(examples, 28, emb, group=3)
    for mode in ("ranking_x_gap", "ranking", "gap"):
        assert_matches_reference(b, mode=mode)
    assert len(set(load_reward("ume")(b)["ranking"].tolist())) > 2


def test_ume_unknown_mode(batch: RewardBatch) -> None:
    with pytest.raises(RewardPluginError, match="ranking_x_gap") as info:
        load_reward("ume")(batch, mode="nope")
    assert isinstance(info.value.__cause__, ValueError)


def hand_batch(pos_second: list[float]) -> RewardBatch:
    """G=2, D=2: query 0 (both responses [1, 0]), positive target 1, explicit negative target 2."""
    rows = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], pos_second, [0.6, 0.8], [0.0, 1.0]]
    return make_batch([(0, 1, [2])], 3, torch.tensor(rows), group=2)


def test_ranking_hand_case_with_tie() -> None:
    # S+ = {1.0, 0.6}, S- = {0.6, 0.0}: the positive 0.6 ties the negative 0.6 at the cut-off k=2 and
    # loses, so ranking = 1/2; gap = 0.8 - 0.3 = 0.5.
    out = assert_matches_reference(hand_batch([0.6, 0.8]), in_batch_negatives=False)
    torch.testing.assert_close(out["ranking"][:2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out["gap"][:2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out["embedding"][:2], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(out["reward"][:2], torch.tensor([1.25, 1.25]))
    # Target 1 has no negatives and target 2 no positives: embedding reward 0, format reward only.
    torch.testing.assert_close(out["reward"][2:], torch.ones(4))


def test_ranking_hand_case_without_tie() -> None:
    # S+ = {1.0, 0.8}, S- = {0.6, 0.0}: both positives rank first.
    out = load_reward("ume")(hand_batch([0.8, 0.6]), in_batch_negatives=False, mode="ranking")
    torch.testing.assert_close(out["embedding"][:2], torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        (GOOD, True),
        ("<think>reasoning</think><answer>a red car</answer><gen_emb>", True),
        ("  <think>r</think>\n<answer> s \n<gen_emb>\n", True),
        ("<answer>red car<gen_emb>", False),
        ("<think>r</think><answer>red car", False),
        ("<think>r</think><answer>red car<gen_emb> trailing text", False),
    ],
)
def test_format_reward(response: str, ok: bool) -> None:
    b = hand_batch([0.8, 0.6])
    b.responses[0] = response
    out = load_reward("ume")(b, format_weight=2.0)
    assert out["format"][0].item() == float(ok)
    torch.testing.assert_close(out["reward"][0], 2.0 * float(ok) + out["embedding"][0])


def test_registry_lists_builtins() -> None:
    found = available_rewards()
    assert {"ume", "cosine_margin"} <= set(found)
    assert all(not name.startswith("_") for name in found)


def test_example_plugin_runs(batch: RewardBatch) -> None:
    out = load_reward("cosine_margin")(batch, margin_weight=0.5)
    assert {"reward", "format", "margin"} == set(out)
    assert torch.isfinite(out["reward"]).all() and out["reward"].shape == (NUM_PROMPTS * GROUP,)
    assert torch.any(out["margin"] != 0)


def test_unknown_reward_lists_available() -> None:
    with pytest.raises(KeyError, match="cosine_margin") as info:
        load_reward("no_such_reward")
    assert "ume" in str(info.value)


BAD_PLUGINS = {
    "raises": ("raise RuntimeError('boom')", "boom"),
    "nan": ("return {'reward': torch.full((n,), float('nan'))}", "'reward' of shape"),
    "shape": ("return {'reward': torch.zeros(n), 'extra': torch.zeros(n, 2)}", r"'extra' has shape \("),
    "noreward": ("return {'score': torch.zeros(n)}", "without 'reward'"),
    "notdict": ("return torch.zeros(n)", "expected a dict"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PLUGINS))
def test_bad_plugin_raises_plugin_error(tmp_path, batch: RewardBatch, kind: str) -> None:
    body, message = BAD_PLUGINS[kind]
    name = f"bad_{kind}"
    source = (
        f"import torch\n\ndef compute_reward(batch, **kwargs):\n    n = len(batch.responses)\n    {body}\n"
    )
    (tmp_path / f"{name}.py").write_text(source)
    with pytest.raises(RewardPluginError, match=message) as info:
        load_reward(name, path=str(tmp_path))(batch)
    assert name in str(info.value)


def test_plugin_from_file_path_and_directory_override(tmp_path, batch: RewardBatch) -> None:
    plugin = tmp_path / "ume.py"  # same name as the built-in: a user directory takes precedence
    plugin.write_text(
        "import torch\n\n"
        "def compute_reward(batch):\n    return {'reward': torch.ones(len(batch.responses))}\n"
    )
    assert available_rewards([str(tmp_path)])["ume"] == plugin.resolve()
    for fn in (load_reward("ume", path=str(tmp_path)), load_reward("mine", path=str(plugin))):
        torch.testing.assert_close(fn(batch)["reward"], torch.ones(NUM_PROMPTS * GROUP))


def test_plugin_without_compute_reward(tmp_path) -> None:
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"'empty' .*empty\.py.*compute_reward"):
        load_reward("empty", path=str(tmp_path))


def test_reward_fn_pickles_by_name(batch: RewardBatch) -> None:
    fn = pickle.loads(pickle.dumps(load_reward("ume")))
    assert fn.name == "ume"
    assert torch.isfinite(fn(batch)["reward"]).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("responses", ["x"]),
        ("prompt_index", torch.zeros(3, dtype=torch.long)),
        ("has_gen_emb", torch.ones(NUM_PROMPTS * GROUP)),
        ("roles", ["query"] * (NUM_PROMPTS - 1) + ["doc"]),
        ("positives", [[0]] + [[]] * (NUM_PROMPTS - 1)),
        ("negatives", [[99]] + [[]] * (NUM_PROMPTS - 1)),
        ("in_batch_negatives", [[4]] + [[]] * (NUM_PROMPTS - 1)),
    ],
)
def test_validate_names_field(batch: RewardBatch, field: str, value: object) -> None:
    setattr(batch, field, value)
    with pytest.raises(ValueError, match=field):
        load_reward("ume")(batch)
