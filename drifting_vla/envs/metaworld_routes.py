"""Two-route experts for Meta-World's wall tasks: the multimodal suite (`data=metaworld_multimodal`).

Meta-World's stock experts are deterministic functions of the state, so every demonstration of a
scene takes the same action and a regression head loses nothing by averaging. Here each
demonstration goes around the wall on the LEFT or on the RIGHT, drawn by a fair coin from the
episode's seed. Both routes succeed on their own; their per-step average drives the hand (or the
carried puck) into the middle of the wall and stalls there. This is the case a generative policy
exists for: it must commit to one route per episode, where a regression head averages them.

The experts, like the stock ones, are stateless functions of the 39-d state (`hand xyz, gripper,
object xyz, ..., goal xyz`) plus the route, so "the average of the two routes" is well defined at
every state (`benchmarks/experts.py` replays it). Every waypoint stays below the top of the wall,
so neither route can be cut short by going over it.

`RouteTracker` labels what a rollout did (left, right, over the wall, or never past it) from the
positions alone, so a policy's episodes are labelled exactly like the experts'.
"""

from __future__ import annotations

import numpy as np

ROUTES = ("left", "right")
EXPERT_VERSION = 1
"""Part of the demo store's cache key: bump it whenever an expert's behaviour changes."""

# The wall of the *-wall-v3 scenes (sawyer_*_wall_v3.xml): a box centred at (0.1, 0.75, 0.06)
# with half-sizes (0.12, 0.01, 0.06).
WALL_X = (-0.02, 0.22)
WALL_Y = 0.75
WALL_TOP = 0.12

SIDE_X = {"left": -0.22, "right": 0.36}
"""Where each route passes the wall: 0.2 beyond the left edge, 0.14 beyond the right one (the hand
starts near x = 0, so the two detours are about as long). Their midpoint lies inside the wall."""
BEFORE_WALL_Y = 0.66
PAST_WALL_Y = 0.84
REACH_HEIGHT = 0.07
AT_WAYPOINT = 0.03

TRACKED = {"reach-wall-v3": "hand", "push-wall-v3": "object", "pick-place-wall-v3": "object"}
"""What must get past the wall in each task: the hand itself, or the puck it carries."""


def check_route_task(task: str) -> None:
    if task not in TRACKED:
        raise ValueError(f"no two-route expert for Meta-World task {task!r}; route tasks: {sorted(TRACKED)}")


def route_for_seed(seed: int) -> str:
    """The demonstration's route: a fair coin drawn from the episode seed alone, so a store is
    reproducible and the route cannot be read from the first observation."""
    return ROUTES[int(np.random.default_rng([int(seed), 0x0517E]).integers(2))]


def _waypoint(point: np.ndarray, route: str, goal: np.ndarray, height: float) -> np.ndarray:
    """Next target of the tracked point: beside the wall, then past it, then the goal."""
    side_x = SIDE_X[route]
    if point[1] < PAST_WALL_Y - AT_WAYPOINT:
        if abs(point[0] - side_x) > AT_WAYPOINT:
            return np.array([side_x, min(point[1], BEFORE_WALL_Y), height])
        return np.array([side_x, PAST_WALL_Y, height])
    return goal


def _move(hand: np.ndarray, target: np.ndarray, gain: float, limit: float = 1.0) -> np.ndarray:
    return np.clip(gain * (target - hand), -limit, limit)


class RouteExpert:
    """The scripted expert of one wall task that takes `route` around the wall."""

    GRASPED_OPENING = 0.6
    """The gripper reads about 0.46 closed on the puck and 1.0 open: below this it holds the puck."""

    def __init__(self, task: str, route: str) -> None:
        check_route_task(task)
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid: {list(ROUTES)}")
        self.task, self.route = task, route

    def get_action(self, state: np.ndarray) -> np.ndarray:
        hand, goal = state[:3], state[-3:]
        action = np.zeros(4)
        if TRACKED[self.task] == "hand":
            action[:3] = _move(hand, _waypoint(hand, self.route, goal, REACH_HEIGHT), gain=5.0)
            return action.astype(np.float32)
        puck = state[4:7]
        above = puck + np.array([-0.005, 0.0, 0.0])
        if np.linalg.norm(hand[:2] - above[:2]) > 0.02:
            target = above + np.array([0.0, 0.0, 0.2])
        elif abs(hand[2] - above[2]) > 0.04 or state[3] > self.GRASPED_OPENING:
            target = above + np.array([0.0, 0.0, 0.03])
        else:  # carry the puck: move the hand by the puck's offset to its waypoint
            target = hand + _waypoint(puck, self.route, goal, puck[2]) - puck
        near = np.linalg.norm(hand[:2] - puck[:2]) <= 0.02 and abs(hand[2] - puck[2]) <= 0.1
        # Half speed while carrying: at full speed the puck slips out of the fingers sideways.
        action[:3] = _move(hand, target, gain=10.0, limit=0.5)
        action[3] = 0.6 if near else 0.0
        return action.astype(np.float32)


class RouteTracker:
    """Which way the tracked point (hand or puck) got past the wall's line, from its positions.

    `left`/`right`: it crossed y = WALL_Y beside the wall; `over`: above it; `none`: it never got
    past (the averaging failure). The first crossing counts.
    """

    def __init__(self, task: str) -> None:
        check_route_task(task)
        self.tracked = TRACKED[task]
        self.label = "none"
        self._previous: np.ndarray | None = None

    def reset(self, state: np.ndarray) -> None:
        self.label = "none"
        self._previous = self._point(state)

    def update(self, state: np.ndarray) -> str:
        point = self._point(state)
        if self.label == "none" and self._previous is not None and self._previous[1] < WALL_Y <= point[1]:
            if point[2] > WALL_TOP:
                self.label = "over"
            elif point[0] < (WALL_X[0] + WALL_X[1]) / 2:
                self.label = "left"
            else:
                self.label = "right"
        self._previous = point
        return self.label

    def _point(self, state: np.ndarray) -> np.ndarray:
        return np.asarray(state[:3] if self.tracked == "hand" else state[4:7], dtype=np.float64)
