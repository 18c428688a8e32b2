"""The expert check behind scripts/verify_experts.py: which ways each suite is run, the figures of
a way, and one stock Meta-World check end to end."""

from __future__ import annotations

import pytest

from drifting_vla.configs import data_config
from drifting_vla.evaluation.expert_check import _figures, check_experts, format_table, ways


@pytest.mark.parametrize(("name", "expected"), [
    ("metaworld_mt10", ["stock"]),
    ("metaworld_multimodal", ["left", "right", "average"]),
    ("aloha_insertion", ["scripted"]),
    ("aloha_transfer_cube_bimodal", ["early_high", "late_low", "average"]),
])
def test_each_suite_runs_its_routes_and_their_average_or_its_one_expert(name, expected):
    assert ways(data_config(name)) == expected


def test_a_ways_figures_count_successes_failed_seeds_labels_and_the_length_of_successes():
    episodes = [{"seed": 7, "success": True, "steps": 10, "mode": "left"},
                {"seed": 8, "success": False, "steps": 50, "mode": None},
                {"seed": 9, "success": True, "steps": 20, "mode": "left"}]
    figures = _figures(episodes)
    assert figures["success"] == pytest.approx(2 / 3) and figures["episodes"] == 3
    assert figures["failed_seeds"] == [8] and figures["modes"] == {"left": 2}  # seed 8 carries no label
    assert figures["mean_steps_of_successes"] == 15.0
    assert 0 < figures["ci95"][0] < 2 / 3 < figures["ci95"][1] < 1
    replayed = _figures([{"seed": 1, "success": True, "mode": None, "max_reward": 4.0}])
    assert replayed["mean_steps_of_successes"] is None  # ALOHA replays whole episodes
    assert replayed["modes"] == {}  # one expert, no routes to label


def test_a_data_config_without_scripted_experts_is_refused():
    with pytest.raises(ValueError, match=r"'lerobot' has no scripted experts to check; checked: \['aloha', 'metaworld'\]"):
        check_experts(data_config("lerobot"), episodes=1, workers=1)


def test_the_stock_experts_of_a_task_without_routes_are_checked_end_to_end():
    pytest.importorskip("metaworld")
    cfg = {**data_config("metaworld_mt10"), "tasks": ["reach-v3"]}
    report = check_experts(cfg, episodes=2, workers=1)
    cell = report["table"]["reach-v3"]["stock"]
    assert cell["success"] == 1.0 and cell["episodes"] == 2 and cell["failed_seeds"] == []
    assert [e["seed"] for e in report["episodes"]] == [100000, 100001] and report["seeds"] == {"start": 100000, "count": 2}
    assert format_table(report["table"]).splitlines()[1].split()[:3] == ["reach-v3", "1.00", "[0.34,"]
