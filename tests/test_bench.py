"""The benchmark's registry, spec validation and results store."""

from __future__ import annotations

import copy
import sqlite3
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from survey_lib import bench
from survey_lib.bench import registry as R
from survey_lib.bench import spec as SP
from survey_lib.bench import store as ST
from survey_lib.methods import CHANGES

ROOT = Path(__file__).resolve().parents[1]
MAIN_FAMILIES = ("pruning_sharing", "quantization", "low_rank", "compact_filters", "distillation_dynamic")


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------
def test_registry_covers_every_family_and_describes_each_method():
    families = {m.family for m in bench.methods()}
    assert set(MAIN_FAMILIES) <= families <= set(bench.FAMILIES)
    for m in bench.methods():
        assert set(m.changes) <= set(CHANGES), m.name
        assert m.description, m.name
        if m.valid is None:
            assert m.points == () and m.check_point(None) is None
        else:
            assert m.point and m.points and all(m.check_point(p) == p for p in m.points), m.name
    assert [m.name for m in bench.methods("low_rank")] == ["tucker2"]


def test_registry_rejects_unknown_names_points_and_unsupported_targets():
    with pytest.raises(ValueError, match="method.*magnitude_prune"):
        bench.get_method("magnitude")
    with pytest.raises(ValueError, match="family"):
        bench.methods("pruning")
    prune = bench.get_method("magnitude_prune")
    with pytest.raises(ValueError, match="operating point of 'magnitude_prune'"):
        prune.check_point(0.5)
    with pytest.raises(ValueError, match="operating point"):
        prune.check_point("four")
    with pytest.raises(ValueError, match="single setting"):
        bench.get_method("depthwise_separable").check_point(4)
    assert "architectures" in bench.get_method("depthwise_separable").supports("classification", "mlp")
    assert bench.get_method("magnitude_prune").supports("segmentation", "vgg") is None


def test_operating_points_map_to_each_methods_parameter():
    assert R.sparsity_for(4) == 0.75
    assert R.bits_for(4) == 8 and R.bits_for(8) == 4 and R.bits_for(64) == 1
    assert abs((1 - R.channel_ratio_for(4)) ** 2 - 0.25) < 1e-12   # both sides of a conv keep half: 1/4 of its weights


@pytest.mark.parametrize("name", ["magnitude_prune", "l1_filter_prune", "ptq", "tucker2", "kd_thin_student"])
def test_applying_a_method_returns_a_new_model_and_leaves_the_input(name, ctx, trained):
    model = copy.deepcopy(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = bench.get_method(name)
    out = method.apply(model, ctx, method.points[0])
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out(ctx.example_input(2)).shape == model(ctx.example_input(2)).shape


def test_apply_needs_a_survey_lib_model(ctx):
    with pytest.raises(TypeError, match="survey_lib model"):
        bench.get_method("ptq").apply(torch.nn.Linear(3, 3), ctx, 4)


# ----------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------
def good_spec() -> dict:
    return {"bench": {"name": "t", "baseline_profile": "default", "finetune_epochs": 1, "seeds": [0, 1],
                      "hardware": ["host", "int8_npu"]},
            "targets": [{"task": "classification", "dataset": "shapes", "arch": "vgg"},
                        {"task": "segmentation", "dataset": "shapes", "arch": "vgg"}],
            "methods": {"magnitude_prune": [2, 8], "depthwise_separable": []}}


def test_shipped_specs_load_and_the_default_covers_every_family_every_shapes_task_hardware_and_seeds():
    from survey_lib.data import TASKS

    default = SP.load_spec(ROOT / "data/bench/default.toml")
    families = {bench.get_method(m).family for m in default.methods}
    assert set(MAIN_FAMILIES) <= families
    assert {r.task for r in default.runs() if r.dataset == "shapes"} == set(TASKS)   # notebook 08 compares them
    assert len(default.seeds) >= 3 and len(default.hardware) >= 3
    full = SP.load_spec(ROOT / "data/bench/full.toml")
    assert set(default.methods) <= set(full.methods) and len(full.runs()) > len(default.runs())


def test_cifar10_joins_the_full_sweep_only_where_its_files_are_present(tmp_path, monkeypatch):
    from survey_lib import data

    from test_data import write_fake_cifar

    monkeypatch.delenv(data.CIFAR10_ENV, raising=False)
    full = SP.load_spec(ROOT / "data/bench/full.toml")
    without = len(full.runs())
    assert "cifar10" not in {r.dataset for r in full.runs()}
    assert any("cifar10" in line and data.CIFAR10_ENV in line for line in full.skipped())
    raw = good_spec()
    raw["targets"].append({"task": "classification", "dataset": "cifar10", "arch": "vgg"})
    with pytest.raises(SP.SpecError, match=r"#3 \(classification/cifar10\).*when_present = true"):
        SP.parse_spec(raw)   # a target that cannot load is refused before anything trains
    raw["targets"][-1]["when_present"] = "yes"
    with pytest.raises(SP.SpecError, match="when_present must be true or false"):
        SP.parse_spec(raw)
    write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=4)
    monkeypatch.setenv(data.CIFAR10_ENV, str(tmp_path))
    present = SP.load_spec(ROOT / "data/bench/full.toml")
    cifar = [r for r in present.runs() if r.dataset == "cifar10"]
    assert cifar and {r.method for r in cifar} > {"baseline", "ptq"} and len(present.runs()) > without
    assert not any("cifar10" in line and "when_present" in line for line in present.skipped())


def test_spec_lists_runs_with_the_shared_budget_and_stable_keys():
    spec = SP.parse_spec(good_spec())
    runs = spec.runs()
    assert len(runs) == 2 * (1 + 2 + 1) * 2   # targets x (baseline + points of prune + one setting) x seeds
    assert runs[0].method == "baseline"
    assert {r.finetune_epochs for r in runs} == {1} and {r.baseline_profile for r in runs} == {"default"}
    assert len({r.key for r in runs}) == len(runs)
    again = SP.parse_spec(good_spec()).runs()
    assert [r.key for r in again] == [r.key for r in runs]
    raw = good_spec()
    raw["bench"]["finetune_epochs"] = 2
    assert SP.parse_spec(raw).runs()[0].key != runs[0].key


def test_a_spec_shifted_to_other_seeds_keeps_everything_else():
    spec = SP.parse_spec(good_spec())
    moved = spec.with_seeds(3)
    assert moved.seeds == (3, 4) and moved.targets == spec.targets and moved.methods == spec.methods
    assert {r.seed for r in moved.runs()} == {3, 4} and not {r.key for r in moved.runs()} & {r.key for r in spec.runs()}
    with pytest.raises(ValueError, match="seed"):
        spec.with_seeds(-1)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["methods"].update(magnitude=[2]), r"\[methods\] = 'magnitude' is unknown"),
    (lambda s: s["methods"].update(magnitude_prune=[0.5]), r"magnitude_prune: operating point 0.5 does not apply"),
    (lambda s: s["methods"].update(magnitude_prune=[]), r"magnitude_prune needs at least one operating point"),
    (lambda s: s["methods"].update(magnitude_prune=4), r"magnitude_prune must be a list"),
    (lambda s: s["methods"].update(depthwise_separable=[4]), r"depthwise_separable has a single setting"),
    (lambda s: s["targets"][0].update(task="captioning"), r"#1.task .*'captioning' is unknown"),
    (lambda s: s["targets"][1].update(dataset="digits"), r"#2.task \(for dataset 'digits'\)"),
    (lambda s: s["targets"][0].update(arch="mlp", task="segmentation"), r"#1.task \(for arch 'mlp'\)"),
    (lambda s: s["bench"].update(hardware=["host", "tpu"]), r"hardware = 'tpu' is unknown"),
    (lambda s: s["bench"].update(seeds=[0, 0]), r"seeds must be distinct"),
    (lambda s: s["bench"].update(finetune_epochs=0), r"finetune_epochs must be an integer >= 1"),
    (lambda s: s["bench"].update(baseline_profile="huge"), r"baseline_profile = 'huge' is unknown"),
    (lambda s: s["bench"].update(colour="red"), r"unknown key\(s\) \['colour'\] in \[bench\]"),
    (lambda s: s.pop("targets"), r"\[\[targets\]\] table is required"),
    (lambda s: s.pop("bench"), r"\[bench\] table is required"),
    (lambda s: s["bench"].update(hardware=["host", "host"]), r"\[bench\].hardware lists \['host'\] more than once"),
    (lambda s: s["targets"].append(dict(s["targets"][0])), r"\[\[targets\]\] lists \['classification/shapes/vgg'\]"),
    (lambda s: s["methods"].update(magnitude_prune=[4, 4.0]), r"\[methods\].magnitude_prune lists \['4.0'\]"),
    (lambda s: (s["methods"].update(kd_thin_student=[32]), s["targets"][0].update(dataset="digits")),
     r"kd_thin_student: operating point 32.0 does not apply to classification/digits/vgg: .*smallest width"),
    (lambda s: s["bench"].update(expected_minutes=float("nan")), r"expected_minutes must be a positive number"),
    (lambda s: s["bench"].update(name=" "), r"name must be a non-empty string"),
])
def test_a_bad_spec_is_rejected_naming_the_entry(change, message):
    raw = good_spec()
    change(raw)
    with pytest.raises(SP.SpecError, match=message):
        SP.parse_spec(raw, source="bad.toml")


def test_a_spec_file_that_is_not_toml_is_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[bench\nname = 1")
    with pytest.raises(SP.SpecError, match="not valid TOML"):
        SP.load_spec(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SP.load_spec(tmp_path / "missing.toml")


def test_a_spec_where_no_method_supports_any_target_is_rejected():
    raw = good_spec()
    raw["targets"] = [{"task": "classification", "dataset": "digits", "arch": "mlp"}]
    raw["methods"] = {"depthwise_separable": []}
    with pytest.raises(SP.SpecError, match="nothing to run"):
        SP.parse_spec(raw)


# ----------------------------------------------------------------------------------------------------------
# Store
# ----------------------------------------------------------------------------------------------------------
def run_row(key: str, **kw) -> dict:
    return {"key": key, "method": "magnitude_prune", "family": "pruning_sharing", "point": 4.0, "task": "classification",
            "dataset": "shapes", "arch": "vgg", "seed": 0, "config": {"finetune_epochs": 1}, "metrics": {"accuracy": 0.9},
            "versions": {"torch": torch.__version__}, "host": {"cpu": "test"}, "seconds": 1.5, **kw}


def costs(**kw) -> list[dict]:
    return [{"hardware": "counted", "name": "params", "value": 1000, "kind": "counted", "unit": "", **kw},
            {"hardware": "int8_npu", "name": "latency_ms", "value": 0.5, "kind": "estimated", "unit": "ms"}]


def test_store_writes_each_run_once_and_keeps_it_across_reopen(tmp_path):
    path = tmp_path / "bench.sqlite"
    with bench.ResultsStore(path) as store:
        assert store.add_run(run_row("a"), costs()) is True
        assert store.add_run(run_row("a", seconds=9.0), costs()) is False   # already stored: nothing written
        assert store.add_costs("a", [{"hardware": "host", "name": "latency_ms", "value": 0.7, "kind": "measured", "unit": "ms"}]) == 1
        assert store.add_costs("a", [{"hardware": "host", "name": "latency_ms", "value": 9.9, "kind": "measured", "unit": "ms"}]) == 0
    with bench.ResultsStore(path) as store:
        assert len(store) == 1 and store.has("a") and not store.has("b")
        runs = store.runs()
        assert runs.loc[0, "seconds"] == 1.5 and runs.loc[0, "metrics"] == {"accuracy": 0.9}
        c = store.costs().set_index(["hardware", "name"])
        assert c.loc[("host", "latency_ms"), "value"] == 0.7 and c.loc[("host", "latency_ms"), "kind"] == "measured"
        table = store.table()
        assert table.loc[0, "int8_npu.latency_ms [estimated]"] == 0.5 and table.loc[0, "metric.accuracy"] == 0.9
        assert store.has_cost("a", "counted", "params")


def test_a_run_is_written_whole_or_not_at_all(tmp_path):
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        duplicate = costs() + [costs()[0]]   # the same (hardware, name) twice: the transaction fails midway
        with pytest.raises(sqlite3.IntegrityError):
            store.add_run(run_row("a"), duplicate)
        assert len(store) == 0 and store.costs().empty


def test_store_takes_numpy_scalars_and_keeps_figures_that_do_not_apply(tmp_path):
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        assert store.add_run(run_row("a", seed=np.int64(2), point=np.float32(4.0), metrics={"accuracy": np.float32(0.5)}),
                             costs(value=float("nan")))
        assert store.runs().loc[0, "seed"] == 2 and np.isnan(store.costs().set_index("name").loc["params", "value"])
        with pytest.raises(ValueError, match="store itself"):
            store.to_csv(tmp_path / "s.sqlite")


def test_store_rejects_bad_rows(tmp_path):
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(TypeError, match="seed"):
            store.add_run(run_row("a", seed="zero"))
        with pytest.raises(ValueError, match="missing"):
            store.add_run(run_row("a"), [{"hardware": "any", "value": 1, "kind": "counted"}])
        with pytest.raises(ValueError, match="kind"):
            store.add_run(run_row("a"), costs(kind="guessed"))
        with pytest.raises(ValueError, match="missing"):
            store.add_run({"key": "b"})
        with pytest.raises(KeyError, match="not in the store"):
            store.add_costs("nope", costs())
        assert len(store) == 0


@pytest.mark.parametrize("make", ["garbage", "foreign", "truncated", "version", "empty_sqlite"])
def test_a_corrupted_or_foreign_store_is_reported_and_left_untouched(tmp_path, make):
    path = tmp_path / "s.sqlite"
    if make == "garbage":
        path.write_bytes(b"not a database at all" * 10)
    elif make == "foreign":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE runs (x)")
        conn.commit()
        conn.close()
    elif make == "empty_sqlite":   # our header (application id, version) on a database without the tables
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE other (x)")
        conn.execute(f"PRAGMA application_id = {ST.APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {ST.SCHEMA_VERSION}")
        conn.commit()
        conn.close()
    else:
        with bench.ResultsStore(path) as store:
            for i in range(30):
                store.add_run(run_row(f"k{i}"), costs())
        if make == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2] + b"\x00" * 17)
        else:
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA user_version = 99")
            conn.close()
    before = path.read_bytes()
    with pytest.raises(bench.StoreError, match="left untouched"):
        bench.ResultsStore(path)
    assert path.read_bytes() == before


def test_store_exports_csv_atomically(tmp_path):
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        store.add_run(run_row("a"), costs())
        store.add_run(run_row("b", seed=1), costs(value=2000))
        out = store.to_csv(tmp_path / "out" / "runs.csv")
    frame = pd.read_csv(out)
    assert list(frame["key"]) == ["a", "b"] and list(frame["counted.params [counted]"]) == [1000, 2000]
    assert [p.name for p in out.parent.iterdir()] == ["runs.csv"]   # no temporary file left behind


def test_store_exports_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        store.add_run(run_row("a"), costs())
        out = store.to_parquet(tmp_path / "runs.parquet")
    assert pd.read_parquet(out).loc[0, "counted.params [counted]"] == 1000


def test_store_path_must_be_a_file(tmp_path):
    with pytest.raises(bench.StoreError, match="folder"):
        bench.ResultsStore(tmp_path)
    with pytest.raises(TypeError, match="path"):
        bench.ResultsStore(3)


# ----------------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------------
def tiny_spec(methods: dict) -> SP.Spec:
    return SP.parse_spec({"bench": {"name": "tiny", "baseline_profile": "default", "finetune_epochs": 1, "seeds": [0],
                                    "hardware": ["mobile_big_core", "int8_npu"]},
                          "targets": [{"task": "classification", "dataset": "digits", "arch": "vgg"}],
                          "methods": methods})


def test_a_sweep_stores_every_run_once_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    from survey_lib.bench import runner

    spec = tiny_spec({"magnitude_prune": [2, 4], "ptq": [4]})
    path = tmp_path / "bench.sqlite"
    real = runner.execute
    calls = []

    def flaky(run, hardware):
        calls.append(run.key)
        if len(calls) == 2:
            raise KeyboardInterrupt   # the sweep is interrupted during its second run
        return real(run, hardware)

    monkeypatch.setattr(runner, "execute", flaky)
    with bench.ResultsStore(path) as store, pytest.raises(KeyboardInterrupt):
        runner.compress(spec, store)
    with bench.ResultsStore(path) as store:
        assert len(store) == 1                               # the finished run survived, the interrupted one left nothing
        assert runner.compress(spec, store) == 3             # the rest, not the stored one again
        assert store.keys() == {r.key for r in spec.runs()}
        assert runner.compress(spec, store) == 0
        assert runner.time_runs(spec, store, runs=30) == 4 and runner.time_runs(spec, store) == 0
        table = store.table()
    assert len(calls) == 1 + 1 + 3
    assert set(table["method"]) == {"baseline", "magnitude_prune", "ptq"}
    ref = table[table["method"] == "baseline"].iloc[0]
    assert abs(ref["host.latency_ratio [measured]"] - 1) < 0.5   # the baseline timed against itself
    assert (table["host.latency_ratio [measured]"] > 0).all()
    assert (table["any.params [counted]"] > 0).all() and (table["metric.accuracy"] > 0.1).all()
    pruned = table[(table["method"] == "magnitude_prune") & (table["point"] == 4)].iloc[0]
    assert abs(pruned["any.sparsity [counted]"] - 0.75) < 0.1


def test_cli_validates_a_spec_before_running_and_reports_bad_stores(tmp_path, capsys):
    from survey_lib.cli import main

    store = tmp_path / "b.sqlite"
    assert main(["bench", str(ROOT / "data/bench/default.toml"), "--store", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(SP.load_spec(ROOT / 'data/bench/default.toml').runs())} runs" in out and not store.exists()
    assert "seeds [0, 1, 2]" in out
    assert main(["bench", str(ROOT / "data/bench/default.toml"), "--store", str(store), "--dry-run", "--seed", "4"]) == 0
    assert "seeds [4, 5, 6]" in capsys.readouterr().out
    assert main(["bench", str(ROOT / "data/bench/default.toml"), "--store", str(store), "--dry-run", "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err and not store.exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('[bench]\nname = "x"\nbaseline_profile = "default"\nfinetune_epochs = 1\nseeds = [0]\n'
                   'hardware = ["host"]\n[[targets]]\ntask = "classification"\ndataset = "shapes"\n[methods]\nprune = [2]\n')
    assert main(["bench", str(bad), "--store", str(store)]) == 2
    assert "[methods] = 'prune' is unknown" in capsys.readouterr().err and not store.exists()
    store.write_bytes(b"junk" * 40)
    assert main(["bench", str(ROOT / "data/bench/default.toml"), "--store", str(store), "--dry-run"]) == 2
    assert "left untouched" in capsys.readouterr().err and store.read_bytes() == b"junk" * 40


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def synthetic_table() -> pd.DataFrame:
    """Three seeds of a baseline, a method worse at every seed, and one that is not measurably different."""
    rows = []
    for seed, base in enumerate([0.90, 0.88, 0.92]):
        for method, family, point, acc, lat in [("baseline", "reference", None, base, 1.0),
                                                 ("magnitude_prune", "pruning_sharing", 4.0, base - 0.05, 0.5),
                                                 ("ptq", "quantization", 4.0, base + (0.01, -0.01, 0.0)[seed], 0.8)]:
            rows.append({"key": f"{method}{seed}", "method": method, "family": family, "point": point, "task": "classification",
                         "dataset": "shapes", "arch": "vgg", "seed": seed, "metric.accuracy": acc,
                         "host.latency_ratio [measured]": lat, "int8_npu.est_latency_s [estimated]": lat * 1e-3})
    return pd.DataFrame(rows)


def test_summary_pairs_each_seed_with_its_baseline_and_calls_differences_only_when_every_seed_agrees():
    from survey_lib.bench import report

    summ = report.summary(synthetic_table()).set_index("method")
    assert summ.loc["magnitude_prune", "delta"] == pytest.approx(-0.05)
    assert summ.loc["magnitude_prune", "verdict"] == "worse at every seed"
    assert summ.loc["ptq", "verdict"] == "no measurable difference"
    assert summ.loc["ptq", "seeds"] == 3 and summ.loc["ptq", "metric_std"] == pytest.approx(np.std([0.91, 0.87, 0.92], ddof=1))
    one_seed = report.summary(synthetic_table().query("seed == 0")).set_index("method")
    assert one_seed.loc["magnitude_prune", "verdict"].startswith("no verdict (1 seed")
    unpaired = synthetic_table().query("not (method == 'baseline' and seed == 2)")   # 3 seeds, 2 with a baseline
    assert report.summary(unpaired).set_index("method").loc["magnitude_prune", "verdict"].startswith("no verdict (2 seeds")
    with pytest.raises(ValueError, match="more than one baseline"):
        report.summary(pd.concat([synthetic_table(), synthetic_table().query("method == 'baseline'")]))


def test_ranking_keeps_method_points_within_the_allowed_drop_and_orders_by_the_hardwares_figure():
    from survey_lib.bench import report

    summ = report.summary(synthetic_table())
    host = report.ranking(summ, "host")
    assert list(host["method"]) == ["ptq", "baseline"] and list(host["rank"]) == [1, 2]
    assert list(report.ranking(summ, "int8_npu")["method"]) == ["ptq", "baseline"]
    with pytest.raises(ValueError, match="not in the store"):
        report.ranking(summ, "mcu_cortex_m7")
    assert "magnitude_prune" in set(report.ranking(summ, "host", max_drop=0.051)["method"])   # it loses 0.05
    assert "magnitude_prune" not in set(report.ranking(summ, "host", max_drop=0.049)["method"])
    with pytest.raises(ValueError, match="max_drop"):
        report.ranking(summ, "host", max_drop=-1)
    md = report.leaderboard(summ, ("host", "int8_npu"))
    assert "### classification on shapes (vgg), accuracy" in md
    assert "| pruning_sharing | magnitude_prune | 4 | 3 | 0.850 | -0.050 | -0.050 to -0.050 | worse at every seed |" in md


def two_task_table() -> pd.DataFrame:
    """Three seeds, two tasks, two hardware targets: A is faster than B on the host, B on the NPU; A keeps
    classification accuracy and loses segmentation mIoU, B the other way round."""
    rows = []
    for seed in range(3):
        for task, metric in [("classification", "accuracy"), ("segmentation", "miou")]:
            for method, lat, npu, change in [("baseline", 1.0, 4e-3, 0.0),
                                             ("tucker2", 0.5, 3e-3, -0.001 if task == "classification" else -0.015),
                                             ("ptq", 0.8, 1e-3, -0.015 if task == "classification" else -0.001)]:
                rows.append({"key": f"{method}-{task}-{seed}", "method": method, "family": "x", "point": None if method == "baseline" else 4.0,
                             "task": task, "dataset": "shapes", "arch": "vgg", "seed": seed,
                             f"metric.{metric}": 0.8 + 0.01 * seed + change + 0.0005 * seed * (method != "baseline"),
                             "any.macs [counted]": {"baseline": 100.0, "tucker2": 30.0, "ptq": 100.0}[method],
                             "any.memory_traffic_bytes [counted]": {"baseline": 400.0, "tucker2": 150.0, "ptq": 110.0}[method],
                             "any.stored_bytes [measured]": {"baseline": 400.0, "tucker2": 130.0, "ptq": 100.0}[method],
                             "host.latency_ratio [measured]": lat, "host.latency_median_ms [measured]": lat * 2,
                             "int8_npu.est_latency_s [estimated]": npu})
    return pd.DataFrame(rows)


def test_pareto_front_holds_the_points_no_other_point_beats_on_both_metric_and_cost():
    from survey_lib.bench import report

    front = report.pareto(report.summary(synthetic_table()), "host.latency_ratio [measured]").set_index("label")
    assert front.loc["magnitude_prune@4", "on_front"] and front.loc["ptq@4", "on_front"]
    assert not front.loc["baseline", "on_front"]      # ptq: the same mean accuracy at a lower latency
    assert list(front["cost"]) == sorted(front["cost"])
    with pytest.raises(ValueError, match="not in the store"):
        report.pareto(report.summary(synthetic_table()), "mcu_cortex_m7.est_energy_j [estimated]")


def test_flips_are_found_between_hardware_targets_and_between_tasks_beyond_the_margins():
    from survey_lib.bench import report

    summ = report.summary(two_task_table())
    hw = report.hardware_flips(summ, ("host", "int8_npu"))
    assert sorted(zip(hw["task"], hw["faster_on_first"], hw["faster_on_second"])) == [
        ("classification", "tucker2@4", "ptq@4"), ("segmentation", "tucker2@4", "ptq@4")]
    assert report.hardware_flips(summ, ("host", "int8_npu"), margin=1.0).empty   # 0.5 vs 0.8 is not 2x apart
    tasks = report.task_flips(summ)
    assert list(zip(tasks["first_task"], tasks["better_on_first"], tasks["better_on_second"])) == [
        ("classification", "tucker2@4", "ptq@4")]
    assert report.task_flips(report.summary(two_task_table().query("task == 'classification'"))).empty


def test_guidelines_cite_the_runs_behind_each_line_and_say_when_the_data_shows_nothing():
    from survey_lib.bench.guidelines import guidelines

    table = two_task_table()
    g = guidelines(table, ("host", "int8_npu")).set_index("guideline")
    assert len(g) >= 5 and all(len(rows) > 0 for rows in g["rows"])
    assert all(k in {key[:10] for key in table["key"]} for rows in g["rows"] for k in rows)
    flips = g.loc[[i for i in g.index if i.startswith("Rank methods")][0], "evidence"]
    assert flips.startswith("2 reversed pairs of method points over 1 of 1 pairs of targets")
    macs = g.loc[[i for i in g.index if i.startswith("Report latency measured")][0], "evidence"]
    assert macs.startswith("2 of 4 method points") and "tucker2@4 (classification): 3.3x fewer MACs, 2.00x as fast" in macs
    one_task = guidelines(table.query("task == 'classification'"), ("host",))
    assert not one_task["guideline"].str.startswith("Evaluate every task").any()      # one task: nothing to compare
    assert not one_task["guideline"].str.startswith("Rank methods").any()             # one target: nothing to compare
    same = table.assign(**{"int8_npu.est_latency_s [estimated]": table["host.latency_ratio [measured]"] * 1e-3})
    quiet = guidelines(same, ("host", "int8_npu")).set_index("guideline")
    assert "no ranking reversed" in quiet.loc[[i for i in quiet.index if i.startswith("Rank methods")][0], "evidence"]


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """A runs table without what differs between two executions of the same runs (timings, dates)."""
    drop = [c for c in table.columns if c in ("seconds", "created") or c.startswith("host.latency") or
            (c.endswith("[measured]") and "stored" not in c)]
    return table.drop(columns=drop).sort_values("key").reset_index(drop=True)


def test_parallel_workers_give_the_same_rows_as_the_sequential_path(tmp_path):
    from survey_lib.bench import runner

    spec = tiny_spec({"magnitude_prune": [4], "ptq": [8]}).with_threads(1)
    with bench.ResultsStore(tmp_path / "seq.sqlite") as seq, bench.ResultsStore(tmp_path / "par.sqlite") as par:
        assert runner.compress(spec, seq) == 3
        assert runner.compress(spec, par, n_jobs=2) == 3
        a, b = comparable(seq.table()), comparable(par.table())
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)
    assert set(a["method"]) == {"baseline", "magnitude_prune", "ptq"}
    assert "int8_npu.est_latency_s [estimated]" in a.columns and "any.stored_bytes [measured]" in a.columns


def test_a_dask_cluster_gives_the_same_rows_as_the_sequential_path(tmp_path):
    from distributed import LocalCluster

    from survey_lib.bench import runner

    spec = tiny_spec({"magnitude_prune": [4], "ptq": [8]}).with_threads(1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster, \
            bench.ResultsStore(tmp_path / "seq.sqlite") as seq, bench.ResultsStore(tmp_path / "dask.sqlite") as dsk:
        assert runner.compress(spec, seq) == 3
        assert runner.compress(spec, dsk, scheduler=cluster.scheduler_address) == 3
        assert runner.compress(spec, dsk, scheduler=cluster.scheduler_address) == 0   # resumable there too
        a, b = comparable(seq.table()), comparable(dsk.table())
        assert all(runner.model_path(dsk, k).exists() for k in b["key"])   # the parent wrote every model
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)
    assert set(b["method"]) == {"baseline", "magnitude_prune", "ptq"}


def test_a_cluster_whose_workers_run_several_tasks_at_once_is_refused(tmp_path):
    from distributed import LocalCluster

    from survey_lib.bench import runner

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            bench.ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(RuntimeError, match="--nthreads 1"):
            runner.compress(tiny_spec({"ptq": [8]}), store, scheduler=cluster.scheduler_address)
        assert len(store) == 0


def test_an_unreachable_scheduler_is_named_in_the_error(tmp_path, monkeypatch):
    from survey_lib.bench import runner

    monkeypatch.setattr(runner, "CONNECT_TIMEOUT_S", 1)
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(RuntimeError, match="scheduler='tcp://127.0.0.1:9'"):
            runner.compress(tiny_spec({"ptq": [8]}), store, scheduler="tcp://127.0.0.1:9")
        with pytest.raises(TypeError, match="scheduler must be"):
            runner.compress(tiny_spec({"ptq": [8]}), store, scheduler=8786)
        assert len(store) == 0


def test_a_killed_sweep_process_resumes_to_the_same_rows_as_an_uninterrupted_one(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[bench]\nname = "kill"\nbaseline_profile = "default"\nfinetune_epochs = 1\nseeds = [0]\n'
                         'hardware = ["int8_npu"]\n[[targets]]\ntask = "classification"\ndataset = "digits"\narch = "vgg"\n'
                         '[methods]\nmagnitude_prune = [2, 4, 8]\nptq = [4, 8]\n')
    cmd = [sys.executable, "-m", "survey_lib.cli", "bench", str(spec_path), "--jobs", "1", "--threads", "1", "--store"]
    killed = tmp_path / "killed.sqlite"
    proc = subprocess.Popen(cmd + [str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:   # kill it once it has stored a run or two
        if killed.exists():
            with bench.ResultsStore(killed) as store:
                if len(store) >= 2:
                    break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with bench.ResultsStore(killed) as store:
        stopped_at = len(store)
    assert 2 <= stopped_at < 6
    subprocess.run(cmd + [str(killed)], check=True, stdout=subprocess.DEVNULL)
    whole = tmp_path / "whole.sqlite"
    subprocess.run(cmd + [str(whole)], check=True, stdout=subprocess.DEVNULL)
    with bench.ResultsStore(killed) as k, bench.ResultsStore(whole) as w:
        assert len(k) == len(w) == 6
        assert len(k.costs()) == len(w.costs())   # no cost figure lost or written twice
        pd.testing.assert_frame_equal(comparable(k.table()), comparable(w.table()), rtol=1e-6)


def test_run_keys_follow_the_library_code(monkeypatch):
    run = SP.parse_spec(good_spec()).runs()[0]
    before = run.key
    SP.bench_code_fingerprint.cache_clear()
    monkeypatch.setattr("survey_lib.baselines.code_fingerprint", lambda: "another version")
    try:
        assert run.key != before
    finally:
        SP.bench_code_fingerprint.cache_clear()


def test_the_thread_count_is_part_of_every_run_key_and_is_what_the_run_trains_at(tmp_path, monkeypatch):
    from dataclasses import replace

    import survey_lib.methods.base as methods_base
    from survey_lib.bench import runner
    from survey_lib.profiles import DEFAULT_THREADS

    spec = tiny_spec({"magnitude_prune": [4]})
    assert {r.threads for r in spec.runs()} == {DEFAULT_THREADS}
    one = spec.with_threads(1)
    assert [r.key for r in one.runs()] != [r.key for r in spec.runs()]   # other last bits: never the same row
    with pytest.raises(ValueError, match="threads=0"):
        spec.with_threads(0)
    seen = []
    real_fit = methods_base.fit
    monkeypatch.setattr(methods_base, "fit", lambda *a, **k: (seen.append(torch.get_num_threads()), real_fit(*a, **k))[1])
    run = one.runs()[-1]
    row, _, _ = runner.execute(run, one.hardware)
    print(f"run at threads={run.threads}: fine-tuned at {seen}, config threads {row['config']['threads']}")
    assert seen and set(seen) == {1} and row["config"]["threads"] == 1
    assert replace(run, threads=2).key != run.key


def test_more_workers_than_cores_warn_before_they_oversubscribe(tmp_path, monkeypatch):
    from survey_lib.bench import runner

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop   # the warning comes before any training: nothing needs to run

    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    monkeypatch.setattr(runner, "prepare_baselines", stop)
    with bench.ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.warns(RuntimeWarning, match="n_jobs=2 processes x 2 torch threads"), pytest.raises(Stop):
            runner.compress(tiny_spec({"ptq": [8]}).with_threads(2), store, n_jobs=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # one process, or 2 x 1 thread on 2 cores: no warning
            for jobs, threads in ((1, 2), (2, 1)):
                with pytest.raises(Stop):
                    runner.compress(tiny_spec({"ptq": [8]}).with_threads(threads), store, n_jobs=jobs)


# ----------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()


def test_the_device_is_part_of_every_run_key_and_recorded_with_the_run(tmp_path):
    from dataclasses import replace

    from survey_lib.bench import runner

    spec = tiny_spec({"ptq": [8]})
    assert {r.device for r in spec.runs()} == {"cpu"} and spec.with_device("cpu").runs() == spec.runs()
    run = spec.runs()[-1]
    assert replace(run, device="cuda").key != run.key   # GPU kernels round differently: never the same row
    row, _, model = runner.execute(replace(run, threads=1), spec.hardware)
    assert row["config"]["device"] == "cpu" and next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: the refusal is for machines without it")
def test_a_cuda_sweep_on_a_machine_without_cuda_is_refused_before_anything_runs(tmp_path, capsys):
    from survey_lib.cli import main

    with pytest.raises(ValueError, match=r"device='cuda'.*sees 0 CUDA device\(s\).*accepted values here: 'cpu'"):
        tiny_spec({"ptq": [8]}).with_device("cuda")
    store = tmp_path / "s.sqlite"
    assert main(["bench", "data/bench/default.toml", "--store", str(store), "--device", "cuda"]) != 0
    assert "device='cuda'" in capsys.readouterr().err and not store.exists()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_cuda_sweep_trains_there_and_stores_cpu_models_with_metrics_near_the_cpu_sweep(tmp_path):
    from survey_lib.bench import runner

    spec = tiny_spec({"l1_filter_prune": [2], "magnitude_prune": [4], "ptq": [8], "kd_thin_student": [4],
                      "kmeans_share": [8]})
    with bench.ResultsStore(tmp_path / "cpu.sqlite") as cpu, bench.ResultsStore(tmp_path / "gpu.sqlite") as gpu:
        spec = spec.with_threads(1)
        assert runner.compress(spec, cpu) == runner.compress(spec.with_device("cuda"), gpu) == 6
        assert runner.time_runs(spec.with_device("cuda"), gpu, runs=5) == 6
        a, b = cpu.table().set_index("method"), gpu.table().set_index("method")
        for key in b["key"]:
            model = torch.load(runner.model_path(gpu, key), weights_only=False)
            assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert set(gpu.runs()["config"].map(lambda c: c["device"])) == {"cuda"}
    assert (abs(a["metric.accuracy"] - b["metric.accuracy"]) < 0.1).all()   # other kernels, same method


def test_sweep_completes_a_store_once_and_refuses_to_run_when_told_not_to(tmp_path):
    from survey_lib.bench import runner

    spec = tiny_spec({"ptq": [4, 8]})
    path = tmp_path / "bench.sqlite"
    with pytest.raises(RuntimeError, match=r"holds 0 of 3 runs: build it first with"):
        runner.sweep(spec, path, run_missing=False)
    assert not path.exists()                                   # a refusal creates no store
    part = runner.sweep(replace(spec, methods={"ptq": (4.0,)}), path)   # two of the three runs
    assert (part.n_runs, part.stored_before, part.ran, part.timed) == (2, 0, 2, 2)
    with pytest.raises(RuntimeError, match=r"holds 2 of 3 runs"):
        runner.sweep(spec, path, run_missing=False)
    first = runner.sweep(spec, path)
    assert (first.n_runs, first.stored_before, first.baselines, first.ran, first.timed) == (3, 2, 1, 1, 1)
    assert set(first.seconds) == {"baselines", "phase 1", "phase 2"} and min(first.seconds.values()) >= 0
    assert sorted(first.table["key"]) == sorted(r.key for r in spec.runs())
    assert first.table["host.latency_ratio [measured]"].notna().all()
    again = runner.sweep(spec, path, run_missing=False)
    assert (again.stored_before, again.baselines, again.ran, again.timed) == (3, 0, 0, 0)
    assert again.describe().startswith("3 of 3 runs were already stored; 0 baselines ready")
    pd.testing.assert_frame_equal(first.table, again.table)
    with pytest.raises(TypeError, match="run_missing"):
        runner.sweep(spec, path, run_missing="no")
    with pytest.raises(ValueError, match="n_jobs"):
        runner.sweep(spec, path, n_jobs=0)


def test_the_build_command_names_what_decides_the_keys(tmp_path):
    from survey_lib.bench import runner

    default = SP.load_spec(ROOT / "data/bench/default.toml")
    store = tmp_path / "s.sqlite"
    assert runner.build_command(default, store) == f"survey-lib bench {default.source} --store {store}"
    shifted = default.with_seeds(3).with_threads(1)
    assert runner.build_command(shifted, store).endswith(f"--store {store} --seed 3 --threads 1")
    assert "SPEC.toml" in runner.build_command(tiny_spec({"ptq": [4]}), store)   # parsed from a dict: no file to name
