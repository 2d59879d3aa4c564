"""Tests for survey_lib.methods.search: the action space, candidates, reward, store, resume and searches."""

from __future__ import annotations

import itertools
import sqlite3

import pytest
import torch
from torch import nn

from survey_lib.data import load
from survey_lib.methods import Context
from survey_lib.methods import search as S
from survey_lib.models import build_model
from survey_lib.tasks import task_for

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("classification", "regression", "detection", "segmentation")


def shapes_model(task_name: str, seed: int = 0) -> tuple[nn.Module, Context]:
    data = load("shapes", task_name, n=48)
    ctx = Context(task=task_for(data), data=data, budget=1, batch_size=32)
    torch.manual_seed(seed)
    return build_model("vgg", ctx.task, in_channels=3, width=0.25).eval(), ctx


def random_archs(layers, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        removed = [bool(layer.removable and torch.rand((), generator=g) < 0.5) for layer in layers]
        ratios = [int(torch.randint(len(S.RATIOS), (), generator=g)) for _ in layers]
        yield S.arch_from_actions(layers, removed, ratios)


def small_deployment(model, ctx, store=None, **kw) -> S.Deployment:
    kw = {"train_images": 64, "latency_runs": 30, **kw}
    return S.Deployment(model, ctx, store=store, **kw)


# ----------------------------------------------------------------------------------------------------------
# Action space and candidates
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name", TASKS)
def test_every_action_sequence_builds_a_net_that_runs_on_the_task_head(task_name):
    model, ctx = shapes_model(task_name)
    x = ctx.example_input(2)
    layers = S.search_layers(model, x)
    assert [layer.removable for layer in layers] == [False, True] * 3
    with torch.no_grad():
        reference = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for removed in itertools.product([False, True], repeat=3):
        flags = [False, removed[0], False, removed[1], False, removed[2]]
        for ratios in ([0] * 6, [len(S.RATIOS) - 1] * 6, [0, 1, 2, 3, 2, 1]):
            arch = S.arch_from_actions(layers, flags, ratios)
            cand = S.build_candidate(model, arch, layers)
            with torch.no_grad():
                out = cand(x)
            assert out.shape == reference.shape, (arch, out.shape)
            n_identity = sum(isinstance(m, nn.Identity) and n.startswith("backbone.") for n, m in cand.named_modules())
            assert n_identity == sum(flags)
            convs = [m for n, m in cand.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("backbone.")]
            assert [c.out_channels for c in convs] == [c for c in arch if c]
    for arch in random_archs(layers, 20):
        assert S.build_candidate(model, arch, layers)(x).shape == reference.shape
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # input not mutated


def test_full_arch_is_the_reference_and_smaller_archs_have_fewer_params(ctx, trained):
    x = ctx.example_input(4)
    layers = S.search_layers(trained, x)
    full = tuple(layer.cout for layer in layers)
    with torch.no_grad():
        assert torch.allclose(S.build_candidate(trained, full, layers)(x), trained(x), atol=1e-6)
    small = S.arch_from_actions(layers, [False] * len(layers), [0] * len(layers))
    assert sum(p.numel() for p in S.build_candidate(trained, small, layers).parameters()) < \
        sum(p.numel() for p in trained.parameters())


def test_removed_layer_passes_the_previous_layers_kept_channels_through():
    model, ctx = shapes_model("classification")
    x = ctx.example_input(2)
    layers = S.search_layers(model, x)
    # make layer 1 (removable, 8 -> 8) an exact identity: then removing it must not change the output
    conv = model.get_submodule(layers[1].name)
    block = model.get_submodule(layers[1].block)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.eye(conv.out_channels)
        bn = block[1]
        bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps), bn.weight.fill_(1), bn.bias.zero_()
    full = tuple(layer.cout for layer in layers)
    removed = (full[0], 0) + full[2:]
    with torch.no_grad():
        assert torch.allclose(S.build_candidate(model, removed, layers)(x), model(x), atol=1e-5)


def test_arch_errors_name_the_layer():
    model, ctx = shapes_model("classification")
    layers = S.search_layers(model, ctx.example_input(1))
    with pytest.raises(ValueError, match="cannot be removed"):
        S.check_arch(layers, (0, 8, 16, 16, 32, 32))
    with pytest.raises(ValueError, match="fewer than"):
        S.check_arch(layers, (8, 2, 16, 16, 32, 32))
    with pytest.raises(ValueError, match="out of range|<="):
        S.check_arch(layers, (8, 8, 16, 16, 32, 64))
    with pytest.raises(ValueError, match="6 searchable layers"):
        S.check_arch(layers, (8, 8))
    with pytest.raises(TypeError, match="sequence"):
        S.check_arch(layers, "8-8")


def test_residual_nets_are_rejected_with_a_clear_error(ctx):
    torch.manual_seed(0)
    model = build_model("resnet", ctx.task, in_channels=1, width=0.25, image_size=8)
    with pytest.raises(ValueError, match="residual"):
        S.search_layers(model, ctx.example_input(1))


# ----------------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------------
def figures(**kw):
    base = {"score": 0.9, "reference_score": 0.95, "params": 1000, "reference_params": 10000, "latency_ratio": 0.5}
    return {**base, **kw}


def test_size_only_reward_is_n2n():
    r = S.reward(figures(), S.SIZE_ONLY)
    c = 1 - 1000 / 10000
    assert r["reward"] == pytest.approx(0.9 / 0.95 * c * (2 - c))
    assert r["latency_saving"] == pytest.approx(0.5) and r["memory_saving"] == pytest.approx(c)
    speed = S.reward(figures(), S.SPEED_FIRST)
    assert speed["reward"] == pytest.approx(0.9 / 0.95 * 0.5 * 1.5)
    mixed = S.reward(figures(), S.RewardWeights(memory=1, latency=3))
    saving = (c + 3 * 0.5) / 4
    assert mixed["saving"] == pytest.approx(saving)
    assert S.reward(figures(), S.RewardWeights(accuracy=2))["reward"] == pytest.approx((0.9 / 0.95) ** 2 * c * (2 - c))


def test_constraints_make_a_candidate_infeasible():
    assert S.reward(figures(score=0.9), S.RewardWeights(max_drop=4.0))["reward"] == -1.0
    assert S.reward(figures(score=0.93), S.RewardWeights(max_drop=4.0))["feasible"]
    assert S.reward(figures(params=5000), S.RewardWeights(min_compression=4.0))["reward"] == -1.0


@pytest.mark.parametrize("kw, match", [
    ({"memory": -1}, "memory"), ({"memory": 0, "latency": 0}, "both 0"), ({"accuracy": 0}, "accuracy"),
    ({"max_drop": -2}, "max_drop"), ({"min_compression": 0.5}, "min_compression"), ({"latency": "a"}, "latency"),
])
def test_invalid_weights_raise(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        S.RewardWeights(**kw)


# ----------------------------------------------------------------------------------------------------------
# Class subsets
# ----------------------------------------------------------------------------------------------------------
def test_restrict_classes_slices_the_logits(ctx, trained):
    x = ctx.example_input(8)
    sub = S.restrict_classes(trained, [3, 1, 7])
    with torch.no_grad():
        assert torch.allclose(sub(x), trained(x)[:, [3, 1, 7]])
    data = S.subset_splits(ctx.data, [3, 1, 7])
    assert set(data.train.tensors[1].tolist()) == {0, 1, 2} and data.info.num_classes == 3
    assert data.info.class_names == tuple(ctx.data.info.class_names[i] for i in (3, 1, 7))


@pytest.mark.parametrize("classes, err, match", [
    ([], ValueError, "at least 2"), ([4], ValueError, "at least 2"), ([1, 1], ValueError, "distinct"),
    ([0, 10], ValueError, r"classes\[1\]"), ([-1, 2], ValueError, r"classes\[0\]"), ("01", TypeError, "list"),
])
def test_bad_class_subsets_raise(ctx, trained, classes, err, match):
    with pytest.raises(err, match=match):
        small_deployment(trained, ctx, classes=classes)


def test_class_subset_needs_classification():
    model, ctx = shapes_model("segmentation")
    with pytest.raises(ValueError, match="classification"):
        small_deployment(model, ctx, classes=[0, 1])


# ----------------------------------------------------------------------------------------------------------
# Searches, store and resume
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [({"episodes": 0}, "zero"), ({"episodes": 3, "seconds": 0}, "zero"),
                                       ({"strategy": "grid"}, "strategy"), ({"weights": {"memory": 1}}, "RewardWeights")])
def test_bad_search_arguments_raise(ctx, trained, kw, match):
    dep = small_deployment(trained, ctx)
    with pytest.raises((ValueError, TypeError), match=match):
        S.search(dep, **kw)


def test_searches_are_seeded_and_strategies_differ(ctx, trained):
    dep = small_deployment(trained, ctx)
    a = S.search(dep, episodes=6, seed=3, progress=False)
    evaluated = dep.evaluations
    b = S.search(dep, episodes=6, seed=3, progress=False)
    assert list(a.episodes["arch"]) == list(b.episodes["arch"])
    assert dep.evaluations == evaluated and b.evaluated == 0 and b.reused == 6   # never evaluated twice
    assert a.episodes["best_reward"].is_monotonic_increasing
    uniform = S.search(dep, strategy="uniform", episodes=50, progress=False)
    assert len(uniform.episodes) == len(S.uniform_archs(dep.layers))
    widths = [c for c in uniform.episodes["channels"].iloc[0]]
    assert widths == [layer.cout for layer in dep.layers]


def test_rl_updates_the_policy_and_warm_start_copies_it(ctx, trained):
    dep = small_deployment(trained, ctx)
    cold = S.search(dep, episodes=8, seed=0, batch=2, progress=False)
    torch.manual_seed(0)
    fresh = S.Controller()   # the search builds its controller under torch.manual_seed(seed)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in cold.controller.items())
    warm = S.search(dep, episodes=2, seed=1, warm_start=cold, progress=False)
    assert warm.key != S.search(dep, episodes=2, seed=1, progress=False).key
    with pytest.raises(ValueError, match="strategy='rl'"):
        S.search(dep, episodes=2, strategy="random", warm_start=cold)


def test_interrupted_search_resumes_from_the_store_without_repeating(ctx, trained, tmp_path, monkeypatch):
    path = tmp_path / "search.sqlite"
    dep = small_deployment(trained, ctx, store=S.SearchStore(path))
    full = S.search(dep, episodes=8, seed=5, strategy="random", progress=False)
    expected = list(full.episodes["arch"])
    dep.store.close()

    path2 = tmp_path / "resumed.sqlite"
    dep2 = small_deployment(trained, ctx, store=S.SearchStore(path2))
    real = S.Deployment.evaluate
    calls = {"n": 0}

    def flaky(self, arch):
        if self.store.candidate(self.key, S.arch_key(arch)) is None:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real(self, arch)

    monkeypatch.setattr(S.Deployment, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.search(dep2, episodes=8, seed=5, strategy="random", progress=False)
    stored = dep2.store.count(dep2.key)
    assert stored == 3
    dep2.store.close()
    monkeypatch.setattr(S.Deployment, "evaluate", real)

    # a new process would reopen the file: a new store and deployment on the same path
    dep3 = small_deployment(trained, ctx, store=S.SearchStore(path2))
    assert dep3.key == dep2.key
    resumed = S.search(dep3, episodes=8, seed=5, strategy="random", progress=False)
    assert list(resumed.episodes["arch"]) == expected
    assert resumed.evaluated == len(set(expected)) - stored and resumed.reused == 8 - resumed.evaluated
    assert len(dep3.store.episodes(resumed.key)) == 8


def test_rl_search_resumes_to_the_same_trace(ctx, trained, tmp_path):
    path = tmp_path / "rl.sqlite"
    dep = small_deployment(trained, ctx, store=S.SearchStore(path))
    short = S.search(dep, episodes=4, seed=2, batch=2, progress=False)
    longer = S.search(dep, episodes=8, seed=2, batch=2, progress=False)
    assert list(longer.episodes["arch"])[:4] == list(short.episodes["arch"])
    assert longer.evaluated == dep.store.count(dep.key) - short.evaluated
    assert longer.episodes["reward"].iloc[:4].tolist() == short.episodes["reward"].tolist()


def test_foreign_or_corrupt_store_files_are_refused_and_left_untouched(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 10)
    with pytest.raises(ValueError, match="not an SQLite"):
        S.SearchStore(junk)
    assert junk.read_bytes() == b"not a database at all" * 10
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="something else"):
        S.SearchStore(other)
    with pytest.raises(TypeError, match="path"):
        S.SearchStore(3)
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        S.SearchStore(tmp_path / "missing" / "store.sqlite")


def test_pareto_front_keeps_the_non_dominated_points():
    import pandas as pd

    pts = pd.DataFrame({"params": [1, 2, 3, 4, 2], "score": [0.5, 0.7, 0.6, 0.9, 0.4]})
    assert pts.loc[S.pareto_front(pts, "params", "score").index].values.tolist() == [[1, 0.5], [2, 0.7], [4, 0.9]]


def test_data_driven_compress_returns_a_smaller_marked_model_and_leaves_the_input(ctx, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    out = S.data_driven_compress(trained, ctx, episodes=3, train_images=64, latency_runs=30)
    assert out.compression["method"] == "data_driven_search" and "dense_shapes" in out.compression["changes"]
    assert sum(p.numel() for p in out.parameters()) <= sum(p.numel() for p in trained.parameters())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert out(ctx.example_input(2)).shape == (2, 10)


def test_shortlist_and_trained_selection(ctx, trained):
    dep = small_deployment(trained, ctx)
    results = [S.search(dep, strategy="random", episodes=4, seed=s, progress=False) for s in (0, 1)]
    top = S.shortlist(results, k=3)
    rewards = {a: r for res in results for a, r in zip(res.episodes["arch"], res.episodes["reward"])}
    assert len(top) == len(set(top)) == min(3, len(rewards))
    assert [rewards[S.arch_key(a)] for a in top] == sorted((rewards[S.arch_key(a)] for a in top), reverse=True)
    assert rewards[S.arch_key(top[0])] == max(rewards.values())
    table, models = S.select_trained(dep, top[:2], S.SIZE_ONLY, epochs=1)
    assert list(table["reward"]) == sorted(table["reward"], reverse=True) and set(models) == set(table["arch"])
    for row in table.to_dict("records"):
        assert row["trained_score"] == pytest.approx(dep.full_ctx.score(models[row["arch"]], "val"))
        c = row["memory_saving"]
        assert row["reward"] == pytest.approx(row["trained_score"] / dep.reference_score * c * (2 - c))
    with pytest.raises(ValueError, match="non-empty"):
        S.select_trained(dep, [])


def test_candidates_that_break_the_size_target_are_rejected_untrained(ctx, trained):
    dep = small_deployment(trained, ctx)
    weights = S.RewardWeights(min_compression=3.0)
    result = S.search(dep, strategy="random", episodes=12, seed=0, weights=weights, progress=False)
    rows = result.episodes
    ratio = dep.reference_params / rows["params"]
    big = ratio < 3.0
    assert big.any() and (~big).any(), "the seed must propose candidates on both sides of the target"
    assert (rows.loc[big, "reward"] == -1).all() and (~rows.loc[big, "trained"].astype(bool)).all()
    assert rows.loc[big, "score"].isna().all() and rows.loc[~big, "score"].notna().all()
    assert result.rejected == int(big.sum())
    assert dep.evaluations == result.evaluated == rows.loc[~big, "arch"].nunique()
    assert all(dep.store.candidate(dep.key, a) is None for a in rows.loc[big, "arch"])   # never trained or stored
    for a, p in zip(rows["channels"], rows["params"]):
        assert p == sum(q.numel() for q in dep.candidate(a).parameters())
    assert set(rows.loc[~big, "seed"]) == {ctx.seed}
    top = S.shortlist([result], k=len(rows))
    assert set(S.arch_key(a) for a in top) == set(rows.loc[~big, "arch"])   # untrained ones are never shortlisted


def _result(rows) -> S.SearchResult:
    import pandas as pd

    df = pd.DataFrame([{"episode": i + 1, "arch": S.arch_key(ch), "channels": list(ch), "params": p, "score": a,
                        "reward": r, "trained": t} for i, (ch, p, a, r, t) in enumerate(rows)])
    return S.SearchResult("random", 0, S.SIZE_ONLY, df, None, 0, 0, 0.0)


def test_front_shortlist_spreads_over_the_pareto_front():
    rows = [((8, 1), 100_000, 0.90, 0.5, True), ((7, 1), 50_000, 0.89, 0.6, True), ((6, 1), 20_000, 0.85, 0.7, True),
            ((5, 1), 10_000, 0.80, 0.8, True), ((4, 1), 1_000, 0.50, 0.4, True),
            ((3, 1), 60_000, 0.70, 0.9, True),            # dominated (bigger and worse than 20_000 @ 0.85)
            ((2, 1), 500, 0.99, -1.0, False)]             # rejected untrained: never on the menu
    result = _result(rows)
    assert S.shortlist([result], k=2) == [(3, 1), (5, 1)]                       # by reward
    assert S.shortlist([result], k=9, by="front") == [(8, 1), (7, 1), (6, 1), (5, 1), (4, 1)]
    assert S.shortlist([result], k=3, by="front") == [(8, 1), (5, 1), (4, 1)]   # both ends and the log-middle (10,000)
    with pytest.raises(ValueError, match="by"):
        S.shortlist([result], k=3, by="best")


def test_deployment_schedule_decays_the_rate_and_is_part_of_the_key(ctx, trained):
    cosine, constant = small_deployment(trained, ctx), small_deployment(trained, ctx, schedule="constant")
    assert cosine.schedule == "cosine" and cosine.key != constant.key   # a store never mixes the two
    rates = []

    class Spy(S.Deployment):
        def _callbacks(self):
            from survey_lib.train import Callback

            class Record(Callback):
                def on_step_end(self, state):
                    rates.append(state.optimizer.param_groups[0]["lr"])
            return super()._callbacks() + [Record()]

    arch = S.arch_from_actions(cosine.layers, [False] * len(cosine.layers), [1] * len(cosine.layers))
    Spy(trained, ctx, train_images=64).evaluate(arch)
    assert rates[0] < cosine.lr and rates[-1] == pytest.approx(0.0, abs=1e-12)   # cosine decays to 0 over the epoch
    with pytest.raises(ValueError, match="schedule"):
        small_deployment(trained, ctx, schedule="step")
