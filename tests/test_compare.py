"""scripts/compare.py: the matrix runs from one command, writes its table and plots, and resumes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_compare(output: Path, data_root: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(ROOT / "scripts" / "compare.py"), "--output", str(output),
        "--runs", "drifting:0", "drifting@g2:0", "regression:0",
        "--variant", "g2", "training.num_samples=2", "--protocols", "drifting:1", "regression:1", "--episodes", "1", "--workers", "1",
        "--", "experiment=tiny_cpu", "data.tasks=[drawer-close-v3]", f"data.root={data_root}",
        "data.train_seeds.count=3", "data.holdout_every=3", "data.collect_workers=1", "training.max_steps=4",
        # A drifting key after --: the drifting run trains with neighbour positives, regression ignores it.
        "training.drifting.positives.source=neighbours", "training.drifting.positives.k=2",
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_compare_writes_table_and_plots_and_resumes_without_retraining(tmp_path):
    output = tmp_path / "cmp"
    first = run_compare(output, tmp_path / "demos")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]

    result = json.loads((output / "comparison.json").read_text())
    rows = {row["protocol"]: row for row in result["rows"]}
    assert set(rows) == {"drifting_nfe1", "drifting@g2_nfe1", "regression_nfe1"}
    assert rows["drifting@g2_nfe1"]["variant"] == "g2" and result["meta"]["variants"] == {"g2": ["training.num_samples=2"]}
    variant_config = (output / "runs" / "drifting@g2_seed0" / "config.yaml").read_text()
    assert "num_samples: 2" in variant_config
    for row in rows.values():
        assert row["episodes"] == 1 and 0.0 <= row["success"] <= 1.0 and row["latency_ms"] > 0
        assert row["label"].startswith("metaworld | " + row["objective"])
    assert rows["drifting_nfe1"]["slowdown_vs_drifting"] == pytest.approx(1.0)
    markdown = (output / "comparison.md").read_text()
    assert "| drifting | - | 1 |" in markdown and "| drifting @g2 | - | 1 |" in markdown
    assert "source: neighbours" in (output / "runs" / "drifting_seed0" / "config.yaml").read_text()
    assert (output / "success_vs_nfe.png").stat().st_size > 10_000
    assert (output / "success_vs_latency.png").stat().st_size > 10_000
    assert (output / "success_by_row.png").stat().st_size > 10_000

    trained = {p: p.stat().st_mtime_ns for p in output.glob("runs/*/trained.json")}
    evaluated = {p: p.stat().st_mtime_ns for p in output.glob("evals/*/*/summary.json")}
    second = run_compare(output, tmp_path / "demos")
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in output.glob("runs/*/trained.json")} == trained
    assert {p: p.stat().st_mtime_ns for p in output.glob("evals/*/*/summary.json")} == evaluated
    assert not list(output.glob("runs/*/checkpoints/step_00000008"))


def test_compare_refuses_a_run_without_a_protocol(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), "--output", str(tmp_path), "--runs", "flow_matching:0", "--protocols", "drifting:1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode != 0 and "flow_matching" in result.stderr


def test_an_undefined_variant_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), "--output", str(tmp_path), "--runs", "drifting@dim:0", "--protocols", "drifting:1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode != 0 and "no --variant 'dim'" in result.stderr


def test_modes_pool_over_seeds():
    from drifting_vla.cli.compare import pooled_modes

    seed0 = {"modes": {"left": {"episodes": 3, "success": 1.0}, "none": {"episodes": 1, "success": 0.0}}}
    seed1 = {"modes": {"right": {"episodes": 4, "success": 0.5}}}
    pooled = pooled_modes([seed0, seed1])
    assert pooled == {
        "left": {"share": 3 / 8, "episodes": 3, "success": 1.0},
        "none": {"share": 1 / 8, "episodes": 1, "success": 0.0},
        "right": {"share": 4 / 8, "episodes": 4, "success": 0.5},
    }
    assert pooled_modes([{"success_rate": 1.0}]) is None


def test_stages_pool_over_seeds_weighted_by_episodes():
    from drifting_vla.cli.compare import pooled_stages

    seed0 = {"per_task_episodes": {"insertion": 10}, "stages": {"insertion": {"both touched": 0.5, "inserted": 0.0}}}
    seed1 = {"per_task_episodes": {"insertion": 30}, "stages": {"insertion": {"both touched": 1.0, "inserted": 0.2}}}
    assert pooled_stages([seed0, seed1]) == {"insertion": {"both touched": pytest.approx(0.875), "inserted": pytest.approx(0.15)}}
    assert pooled_stages([{"success_rate": 1.0}]) is None
    labelled_once = {"per_task_episodes": {"insertion": 5, "transfer_cube": 5},
                     "stages": {"transfer_cube": {"touched": 0.2}, "insertion": {"both touched": 0.4, "inserted": 0.0}}}
    assert set(pooled_stages([labelled_once, seed1])) == {"insertion"}  # seed1 labelled no transfer_cube stages


def test_stages_make_a_table_and_a_plot(tmp_path):
    from drifting_vla.cli.compare import plot_stages, write_markdown

    def row(objective, shares):
        stages = {"transfer_cube": dict(zip(["touched", "lifted", "transfer attempted", "transferred"], shares, strict=True))}
        return {"protocol": f"{objective}_nfe1", "objective": objective, "variant": None, "sampler": None, "nfe": 1,
                "label": "aloha | x | chunk 4/16", "success": shares[-1], "ci95": [0.0, 0.1], "seeds": [0], "success_per_seed": [0.0],
                "seed_std": None, "per_task": {"transfer_cube": shares[-1]}, "modes": None, "stages": stages,
                "latency_ms": None, "encoder_ms": None, "slowdown_vs_drifting": None}

    rows = [row("drifting", [0.9, 0.5, 0.1, 0.04]), row("regression", [0.7, 0.2, 0.0, 0.0])]
    meta = {"data": "aloha", "max_steps": 1, "batch_size": 1, "learning_rate": 1, "ema_decay": 1, "episodes_per_task": 50,
            "execution": "4/16", "machine": "x", "wall_minutes": 1, "train_minutes": 1, "trained_on": "x", "eval_minutes": 1}
    write_markdown(rows, meta, tmp_path / "comparison.md")
    text = (tmp_path / "comparison.md").read_text()
    assert "| protocol | touched | lifted | transfer attempted | transferred |" in text
    assert "| drifting_nfe1 | 90% | 50% | 10% | 4% |" in text and "| regression_nfe1 | 70% | 20% | 0% | 0% |" in text
    plot_stages(rows, tmp_path)
    assert (tmp_path / "stages_reached.png").stat().st_size > 10_000


def test_execution_steps_make_their_own_cells_and_plot(tmp_path):
    from drifting_vla.cli.compare import Run, parse_protocols, plot_execution

    protocols = parse_protocols(["drifting:1", "flow_matching:1,10"], [4, 16])
    assert [p.name for p in protocols] == [
        "drifting_nfe1_exec4", "drifting_nfe1_exec16", "flow_matching_nfe1_exec4", "flow_matching_nfe1_exec16",
        "flow_matching_nfe10_exec4", "flow_matching_nfe10_exec16",
    ]
    assert [p.name for p in parse_protocols(["drifting:1"], [None])] == ["drifting_nfe1"]
    assert Run("drifting", 0, "g4").cell(protocols[0]) == "drifting@g4_nfe1_exec4"

    rows = [
        {"objective": "drifting", "variant": None, "sampler": None, "nfe": 1, "success": rate, "ci95": [rate - 0.1, rate + 0.05],
         "label": f"metaworld | drifting nfe=1 | chunk {k}/16"}
        for k, rate in ((4, 0.8), (8, 0.7), (16, 0.5))
    ]
    plot_execution(rows, tmp_path)
    assert (tmp_path / "success_vs_execute_steps.png").stat().st_size > 10_000


def test_a_cached_cell_evaluated_at_another_horizon_is_not_reused_silently(tmp_path):
    # A comparison resumed after the default execution horizon changed must not pool old cells
    # (evaluated at the old default) with new ones under one protocol.
    from drifting_vla.cli import compare

    run = compare.Run("drifting", 0)
    cell = tmp_path / "evals" / run.name / "drifting_nfe1"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text(json.dumps({"protocol": "metaworld | drifting nfe=1 | chunk 8/16", "success_rate": 0.5}))
    with pytest.raises(SystemExit, match=r"executing 8 of 16 .* asks for 4 .*drifting_nfe1_exec8.*--execute-steps 8"):
        compare.evaluate_run(run, tmp_path / "runs", compare.Protocol("drifting", None, 1), tmp_path, episodes=1, workers=1)
    cell.rename(cell.parent / "drifting_nfe1_exec8")  # the remedy the message names
    kept = compare.evaluate_run(run, tmp_path / "runs", compare.Protocol("drifting", None, 1, execute_steps=8), tmp_path, episodes=1, workers=1)
    assert kept["success_rate"] == 0.5


def test_train_side_by_side_then_evaluate_exports_elsewhere(tmp_path):
    # The GPU workflow: train the matrix side by side with --train-only where there is no simulator,
    # carry each run's final policy back as a save_pretrained export, and evaluate it with the
    # same command: the export is what the checkpoint computes, and the budget is read from it.
    common = [
        "--runs", "drifting:0", "regression:0", "--protocols", "drifting:1", "regression:1", "--episodes", "1", "--workers", "1",
        "--", "experiment=tiny_cpu", "data.tasks=[drawer-close-v3]", f"data.root={tmp_path / 'demos'}",
        "data.train_seeds.count=3", "data.holdout_every=3", "data.collect_workers=1", "training.max_steps=4",
    ]
    trained_dir = tmp_path / "trained"
    compare_script = [sys.executable, str(ROOT / "scripts" / "compare.py")]
    first = subprocess.run([*compare_script, "--output", str(trained_dir), "--parallel", "2", "--train-only", *common],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained 2 runs" in first.stdout
    assert not (trained_dir / "evals").exists() and not (trained_dir / "comparison.json").exists()
    for name in ("drifting_seed0", "regression_seed0"):
        record = json.loads((trained_dir / "runs" / name / "trained.json").read_text())
        assert record["machine"].endswith("CPU cores") and record["seconds"] > 0

    from drifting_vla.inference.policy import DriftingPolicy

    carried = tmp_path / "carried"
    for name in ("drifting_seed0", "regression_seed0"):
        DriftingPolicy.from_checkpoint(trained_dir / "runs" / name).save_pretrained(carried / "runs" / name)
        (carried / "runs" / name / "trained.json").write_text((trained_dir / "runs" / name / "trained.json").read_text())
    second = subprocess.run([*compare_script, "--output", str(carried), *common], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads((carried / "comparison.json").read_text())
    assert {row["protocol"] for row in result["rows"]} == {"drifting_nfe1", "regression_nfe1"}
    assert result["meta"]["max_steps"] == 4 and result["meta"]["trained_on"].endswith("CPU cores")
    assert f"on {result['meta']['trained_on']}, evaluation" in (carried / "comparison.md").read_text()
    assert not list((carried / "runs" / "drifting_seed0").glob("checkpoints"))  # evaluated as carried, not retrained


def test_a_finished_run_trained_with_other_overrides_is_refused_naming_the_keys_or_retrained(tmp_path, monkeypatch):
    """Found by a hostile probe: rerun into the same output with another shared budget, compare.py retrained
    nothing while comparison.json recorded the new override."""
    from drifting_vla.cli import compare

    run = compare.Run("drifting", 0)
    run_dir = tmp_path / "runs" / run.name
    run_dir.mkdir(parents=True)
    old = ["python", "scripts/train.py", "hydra.run.dir=/elsewhere/runs/drifting_seed0", "seed=0",
           "training.objective=drifting", "training.eval.at_end=false", "training.resume=auto", "training.max_steps=5"]
    (run_dir / "trained.json").write_text(json.dumps({"command": old, "seconds": 1.0}))
    evals = tmp_path / "evals" / run.name / "drifting_nfe1"
    evals.mkdir(parents=True)
    (evals / "summary.json").write_text("{}")

    assert compare.train(run, tmp_path, ["training.max_steps=5"]) == run_dir  # the same settings (moved): reused
    with pytest.raises(SystemExit, match=r"trained with other settings .*training\.batch_size: \(not set\) -> 8; "
                                         r"training\.max_steps: 5 -> 9\. .*--retrain"):
        compare.train(run, tmp_path, ["training.max_steps=9", "training.batch_size=8"])

    commands = []

    def fake_train(command, **kwargs):  # records what would train; writes nothing a real run would
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_train)
    compare.train(run, tmp_path, ["training.max_steps=9"], retrain=True)
    assert commands and "training.max_steps=9" in commands[0]
    assert not evals.parent.exists()  # the old run's evaluations went with it
    assert "training.max_steps=9" in json.loads((run_dir / "trained.json").read_text())["command"]
