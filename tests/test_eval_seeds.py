"""Evaluation seeds from the command line: `scripts/simulate_eval.py seeds.start=S seeds.count=N`
evaluates on those seeds instead of the checkpoint's data.eval_seeds, and still refuses any
training seed, naming the overlap and the keys to change."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.evaluation.results import read_episodes
from drifting_vla.formats.validation import validate_eval_config
from tests.helpers import run_simulate_eval, tiny_cfg, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = {"train_seeds": {"start": 0, "count": 50}, "eval_seeds": {"start": 100000, "count": 50}}


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "drifting_vla" / "configs"), version_base=None):
        return compose("eval", overrides=["output=/tmp/unused", *overrides])


def test_a_seed_range_replaces_the_checkpoints_eval_seeds():
    assert evaluation_seeds(DATA, seeds={"start": 200, "count": 3}) == [200, 201, 202]
    assert evaluation_seeds(DATA, 2, seeds={"start": 200, "count": 3}) == [200, 201]
    assert evaluation_seeds(DATA, 2) == [100000, 100001]


def test_a_range_reaching_into_the_training_seeds_is_refused_naming_the_overlap():
    with pytest.raises(ValueError, match=r"evaluation seeds 40, 41, 42, 43, 44, \.\.\. \(10 in all\) are training seeds "
                                         r"\(data.train_seeds: 0 \.\. 49\).*move seeds.start to 50 or above"):
        evaluation_seeds(DATA, seeds={"start": 40, "count": 20})
    shifted = {**DATA, "train_seeds": {"start": 10, "count": 5}}
    with pytest.raises(ValueError, match=r"seeds 14 are training seeds .*seeds.start to 15 or above, or end the range below 10"):
        evaluation_seeds(shifted, seeds={"start": 14, "count": 2})


def test_more_episodes_than_seeds_names_the_key_that_gives_the_seeds():
    with pytest.raises(ValueError, match=r"episodes=5 per task, but seeds.count=3 gives 3 seeds; lower episodes or raise seeds.count"):
        evaluation_seeds(DATA, 5, seeds={"start": 200, "count": 3})
    with pytest.raises(ValueError, match=r"but data.eval_seeds.count=50 .*data.eval_seeds.count.*seeds.start=S seeds.count=N"):
        evaluation_seeds(DATA, 51)


def test_a_data_config_without_eval_seeds_names_keys_that_exist():
    with pytest.raises(KeyError) as error:
        evaluation_seeds({"train_seeds": DATA["train_seeds"]})
    assert set(re.findall(r"([\w.]+)=", str(error.value))) == {"data.eval_seeds", "seeds.start", "seeds.count"}
    cfg = eval_config("seeds.start=5", "seeds.count=3")  # the keys it names are the eval config's
    validate_eval_config(cfg)
    assert (cfg.seeds.start, cfg.seeds.count) == (5, 3)


@pytest.mark.parametrize("overrides,message", [
    (["seeds.start=5"], "config key seeds.start is set without seeds.count: give both"),
    (["seeds.count=5"], "config key seeds.count is set without seeds.start: give both"),
    (["seeds.start=5", "seeds.count=0"], "config key seeds.count=0 must be >= 1"),
    (["seeds.start=-1", "seeds.count=2"], "config key seeds.start=-1 must be >= 0"),
])
def test_half_a_seed_range_or_one_out_of_range_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_eval_config(eval_config(*overrides))


@pytest.fixture
def scripted_checkpoint(tmp_path):
    """A checkpoint of the tiny model for the test simulator `scripted` (tests/fake_envs.py), whose
    episode fate follows its seed: seed % 4 == 0 succeeds at step 3, seed % 4 == 3 never does."""
    cfg = tiny_cfg()
    cfg.data.name = "scripted"
    cfg.data.max_episode_steps = 4
    cfg.data.train_seeds, cfg.data.eval_seeds = DATA["train_seeds"], DATA["eval_seeds"]
    return write_checkpoint(tmp_path / "run", cfg)[0]


def test_simulate_eval_evaluates_on_the_seeds_of_the_command_line(scripted_checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = run_simulate_eval(
        tmp_path / "hydra", f"checkpoint={scripted_checkpoint}", "seeds.start=203", "seeds.count=2", "workers=1",
        "videos_per_task=0", "progress=false", "num_threads=1", "plugins=[tests.fake_envs]", f"output={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {(e["seed"], e["success"]) for e in read_episodes(out)} == {(203, False), (204, True)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 2 and summary["eval"]["seeds"] == {"start": 203, "count": 2}


def test_simulate_eval_refuses_training_seeds_naming_them(scripted_checkpoint, tmp_path):
    result = run_simulate_eval(
        tmp_path / "hydra", f"checkpoint={scripted_checkpoint}", "seeds.start=48", "seeds.count=4", "workers=1",
        "progress=false", "plugins=[tests.fake_envs]", f"output={tmp_path / 'eval'}",
    )
    assert result.returncode != 0
    assert "evaluation seeds 48, 49 are training seeds (data.train_seeds: 0 .. 49)" in result.stderr
    assert "move seeds.start to 50 or above" in result.stderr and not (tmp_path / "eval" / "summary.json").exists()


def test_eval_config_defaults_to_the_checkpoints_eval_seeds():
    cfg = eval_config()
    validate_eval_config(cfg)
    assert OmegaConf.to_container(cfg.seeds) == {"start": None, "count": None}
