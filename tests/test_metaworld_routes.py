"""The multimodal suite: two-route wall experts, the route labeller, and per-mode evaluation figures."""

from __future__ import annotations

import numpy as np
import pytest

from drifting_vla.configs import data_config
from drifting_vla.data.metaworld_demos import collection_config, store_dir
from drifting_vla.envs.metaworld_routes import (
    ROUTES,
    WALL_TOP,
    WALL_Y,
    RouteExpert,
    RouteTracker,
    route_for_seed,
)
from drifting_vla.evaluation.results import EpisodeRecord, EvalSummary


def _state(hand=(0.0, 0.6, 0.2), puck=(0.0, 0.62, 0.02), goal=(0.0, 0.87, 0.15), gripper=1.0):
    state = np.zeros(39)
    state[:3], state[3], state[4:7], state[-3:] = hand, gripper, puck, goal
    return state


def test_the_route_is_a_fair_coin_of_the_seed():
    draws = [route_for_seed(s) for s in range(400)]
    assert draws == [route_for_seed(s) for s in range(400)]
    assert 0.4 < draws.count("left") / len(draws) < 0.6


def test_the_two_routes_pull_apart_and_their_average_does_not_move_sideways():
    state = _state()
    left, right = (RouteExpert("reach-wall-v3", r).get_action(state) for r in ROUTES)
    assert left[0] < -0.5 and right[0] > 0.5
    assert abs((left[0] + right[0]) / 2) < 0.05


def test_unknown_route_or_task_is_a_clear_error():
    with pytest.raises(ValueError, match="route tasks"):
        RouteExpert("reach-v3", "left")
    with pytest.raises(ValueError, match="unknown route"):
        RouteExpert("reach-wall-v3", "up")


@pytest.mark.parametrize(
    ("x", "z", "label"), [(-0.2, 0.07, "left"), (0.35, 0.07, "right"), (0.1, WALL_TOP + 0.05, "over")]
)
def test_the_tracker_labels_the_first_crossing_of_the_wall_line(x, z, label):
    tracker = RouteTracker("reach-wall-v3")
    tracker.reset(_state(hand=(0.0, 0.6, 0.2)))
    assert tracker.update(_state(hand=(x, WALL_Y - 0.01, z))) == "none"
    assert tracker.update(_state(hand=(x, WALL_Y + 0.01, z))) == label
    assert tracker.update(_state(hand=(0.0, 0.6, 0.2))) == label  # coming back does not relabel


def test_the_push_tracker_follows_the_puck_not_the_hand():
    tracker = RouteTracker("push-wall-v3")
    tracker.reset(_state())
    tracker.update(_state(hand=(0.3, 0.9, 0.05), puck=(0.0, 0.62, 0.02)))
    assert tracker.label == "none"
    tracker.update(_state(puck=(-0.2, WALL_Y + 0.02, 0.02)))
    assert tracker.label == "left"


def test_the_multimodal_suite_observes_the_goal_and_keys_its_own_demo_store():
    stock, multimodal = data_config("metaworld"), data_config("metaworld_multimodal")
    assert multimodal["expert"] == "routes" and multimodal["proprio_dim"] == 7
    assert "expert_version" not in collection_config(stock)
    assert collection_config(multimodal)["expert_version"] >= 1
    assert store_dir(stock) != store_dir(multimodal)


def test_the_summary_gives_each_modes_share_and_success():
    records = [
        EpisodeRecord("reach-wall-v3", 1, True, 100, 1.0, mode="left"),
        EpisodeRecord("reach-wall-v3", 2, False, 300, 1.0, mode="none"),
        EpisodeRecord("push-wall-v3", 1, True, 100, 1.0, mode="right"),
        EpisodeRecord("push-wall-v3", 2, False, 200, 1.0, mode="right"),
    ]
    summary = EvalSummary(records).to_dict()
    assert summary["modes"]["right"] == {"share": 0.5, "episodes": 2, "success": 0.5}
    assert summary["modes"]["none"]["share"] == 0.25
    assert summary["per_task_modes"]["reach-wall-v3"]["left"]["success"] == 1.0
    assert "modes:" in EvalSummary(records).format_table()
    assert "modes" not in EvalSummary([EpisodeRecord("reach-v3", 1, True, 10, 1.0)]).to_dict()


def test_a_route_episode_succeeds_and_is_labelled_with_its_route():
    pytest.importorskip("metaworld")
    from drifting_vla.envs.metaworld_env import MetaWorldEnv, run_expert_episode

    with MetaWorldEnv(
        "reach-wall-v3", cameras=("corner",), image_size=16, max_episode_steps=300, expert="routes", observe_goal=True
    ) as env:
        episode = run_expert_episode(env, seed=3)
        assert episode["success"] and episode["mode"] == episode["route"] == route_for_seed(3)
        assert episode["proprio"].shape[1] == 7
        np.testing.assert_allclose(episode["proprio"][:, 4:], episode["state"][:, -3:])
