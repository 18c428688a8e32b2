"""Scripted ALOHA experts: waypoints of the grippers in space, turned into joint targets by
inverse kinematics, replayed in the joint-space task.

gym-aloha ships the tasks but no scripted policy. The published scripted demonstrations (ACT's)
move mocap bodies welded to the grippers through time-indexed waypoints in the end-effector
version of the task and replay the joint trajectory that results. Under the MuJoCo this project
pins (3.3) those welds hold the gripper 13.5 cm behind the mocap body and lag it by centimetres,
so the published waypoints miss the cube (measured: no lift in 6 seeds, one touch). The experts here keep
the method, end-effector waypoints made into a joint trajectory that is replayed, with their own
waypoints and exact kinematics in place of the weld:

1. `WaypointPlan`: each gripper's grasp point (the point between its finger pads), orientation
   and opening (0 closed, 1 open) at a few time steps of the 400-step (8 s, 50 Hz) episode,
   interpolated linearly (orientations by normalised quaternion interpolation), read off the
   object pose at reset (open loop).
2. `joint_trajectory`: damped least-squares inverse kinematics of each arm's 6 joints for every
   step's grasp point and orientation, warm-started from the step before (a smooth trajectory);
   with the commanded openings it gives the 14-d joint-space actions.
3. `aloha_env.run_expert_episode` replays them in the joint-space task (the one evaluated) from the
   same object pose, rendering what the policy sees; a replay that never reaches reward 4 is
   dropped from the demonstrations (`data/demo_store.py`).

Transfer cube: the right gripper comes down on the cube pointing down (fingers on its front and
back faces), closes, lifts it to the hand-over point and opens once the left gripper, pointing
right with its fingers above and below the cube (the upper one between the right's fingers), has
closed on it.
Insertion: each gripper takes its object pointing down and lifts it; the socket waits above the
table's middle while the peg, levelled with it, slides in along the table's x axis onto the pin.

Two-route variant (`ROUTES`): the hand-over happens either early and high in front, or late and
low behind (hand-over points 11 cm apart, 90 steps apart in time), a fair coin per seed
(`route_for_seed`). Each succeeds alone. Averaged step by step, the right gripper's opening is
half open (which releases the 4 cm cube) from the moment the early route lets go, while the
averaged left gripper is still half way from where the late route waits
(`scripts/verify_experts.py` measures it). `aloha_env.HandoverTracker` labels the route an episode took from where the
cube is when the left gripper takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HORIZON = 400
TASKS = ("transfer_cube", "insertion")
ROUTES = ("early_high", "late_low")
"""The two hand-over routes of the two-route transfer-cube variant."""
STANDARD_MEET = np.array([0.0, 0.5, 0.25])
ROUTE_MEETS = {"early_high": np.array([0.0, 0.46, 0.29]), "late_low": np.array([0.0, 0.54, 0.21])}
ROUTE_DELAYS = {"early_high": -30, "late_low": 60}
"""Steps by which each route's hand-over comes before / after the single-route expert's."""
INSERTION_MEET = np.array([0.0, 0.5, 0.2])
CUBE_REST_Z = 0.02
"""The cube's centre height once it rests on the table (half its 4 cm side); gym-aloha places it
at 5 cm and lets it fall."""
GRASP_OFFSET = 0.105
"""Distance (m) from the gripper link's origin along its pointing axis to the grasp point."""
HELD_BELOW = 0.03
"""How far (m) below the right gripper's grasp point the cube it lifted hangs: its fingertips
stop on the table 3 cm short of the cube's centre, so they hold the cube's upper part."""
PEG_GRASP_Z = 0.058
SOCKET_GRASP_Z = 0.055
"""Grasp-point heights for the peg (2 cm tall) and the socket (4 cm tall): the fingertips end
about 1 cm above the table."""
EXPERT_VERSION = 2
"""Bumped whenever a plan changes, so cached demonstrations of an older plan are collected again."""

# Gripper orientations: columns are the gripper link's axes in the world (x: pointing, y: the
# fingers' opening direction).
DOWN_RIGHT = np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], dtype=np.float64).T
DOWN_LEFT = np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=np.float64).T
LEVEL_LEFT = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64).T
LEVEL_LEFT_ROLLED = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64).T
"""Pointing right with the fingers above and below what it grasps."""


def _mat_to_quat(rotation: np.ndarray) -> np.ndarray:
    import mujoco

    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.ascontiguousarray(rotation).reshape(9))
    return quat


def _quat_to_mat(quat: np.ndarray) -> np.ndarray:
    import mujoco

    mat = np.zeros(9)
    mujoco.mju_quat2Mat(mat, quat / np.linalg.norm(quat))
    return mat.reshape(3, 3)


@dataclass(frozen=True)
class Waypoint:
    t: int
    point: np.ndarray  # grasp point, world xyz (3,)
    rotation: np.ndarray  # gripper orientation (3, 3)
    gripper: float  # commanded opening: 0 closed, 1 open


class WaypointPlan:
    """Both arms' waypoints (left, right), each list sorted by time."""

    def __init__(self, left: list[Waypoint], right: list[Waypoint]) -> None:
        self.arms = {"left": left, "right": right}

    def at(self, arm: str, t: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(grasp point (3,), rotation (3, 3), opening) of `arm` at step t, linear between waypoints."""
        waypoints = self.arms[arm]
        after = next((i for i, w in enumerate(waypoints) if w.t >= t), len(waypoints) - 1)
        a, b = waypoints[max(after - 1, 0)], waypoints[after]
        frac = 0.0 if b.t == a.t else float(np.clip((t - a.t) / (b.t - a.t), 0.0, 1.0))
        qa, qb = _mat_to_quat(a.rotation), _mat_to_quat(b.rotation)
        if np.dot(qa, qb) < 0:
            qb = -qb
        rotation = _quat_to_mat((1 - frac) * qa + frac * qb)
        return (1 - frac) * a.point + frac * b.point, rotation, (1 - frac) * a.gripper + frac * b.gripper


def transfer_cube_plan(cube_xyz: np.ndarray, start: dict, meet: np.ndarray = STANDARD_MEET,
                       delay: int = 0) -> WaypointPlan:
    """cube_xyz (3,): the cube at reset; start: {arm: (grasp point, rotation)} at reset; the
    hand-over (every waypoint from step 250 on) happens at `meet`, `delay` steps later."""
    cube = np.array([cube_xyz[0], cube_xyz[1], CUBE_REST_Z])

    def w(t, point, rotation, gripper):
        return Waypoint(min(t + delay, HORIZON) if t >= 250 else t, point, rotation, gripper)

    right = [
        w(0, start["right"][0], start["right"][1], 0.0),
        w(90, cube + [0, 0, 0.10], DOWN_RIGHT, 1.0),     # above the cube
        w(130, cube, DOWN_RIGHT, 1.0),                   # down around it
        w(160, cube, DOWN_RIGHT, 0.0),                   # close
        w(175, cube, DOWN_RIGHT, 0.0),                   # let the fingers close
        w(200, cube + [0, 0, 0.08], DOWN_RIGHT, 0.0),    # lift
        w(250, meet, DOWN_RIGHT, 0.0),                   # to the hand-over point
        w(310, meet, DOWN_RIGHT, 0.0),
        w(330, meet, DOWN_RIGHT, 1.0),                   # open once the left gripper holds it
        w(370, meet + [0.12, 0, 0.04], DOWN_RIGHT, 1.0),  # move away
        w(HORIZON, meet + [0.12, 0, 0.04], DOWN_RIGHT, 1.0),
    ]
    take = meet + [-0.02, 0, -HELD_BELOW]  # the cube hangs at the right fingertips, below the grasp point
    left = [
        w(0, start["left"][0], start["left"][1], 0.0),
        w(120, take + [-0.12, 0, 0], LEVEL_LEFT_ROLLED, 1.0),   # wait beside the hand-over point
        w(250, take + [-0.12, 0, 0], LEVEL_LEFT_ROLLED, 1.0),
        w(280, take, LEVEL_LEFT_ROLLED, 1.0),                   # move in around the cube
        w(300, take, LEVEL_LEFT_ROLLED, 0.0),                   # close
        w(330, take, LEVEL_LEFT_ROLLED, 0.0),
        w(370, take + [-0.10, 0, 0.02], LEVEL_LEFT_ROLLED, 0.0),  # pull the cube away
        w(HORIZON, take + [-0.10, 0, 0.02], LEVEL_LEFT_ROLLED, 0.0),
    ]
    return WaypointPlan(left, right)


def insertion_plan(peg_xyz: np.ndarray, socket_xyz: np.ndarray, start: dict) -> WaypointPlan:
    """The right gripper takes the peg, the left the socket, both from above with the fingertips
    just clear of the table (fingers pressed on the table do not close); they meet above the
    table's middle and the peg slides 3 cm into the socket along x, onto the pin inside it."""
    peg = np.array([peg_xyz[0], peg_xyz[1], PEG_GRASP_Z])
    socket = np.array([socket_xyz[0], socket_xyz[1], SOCKET_GRASP_Z])
    # Level the peg's centre (1 cm high, PEG_GRASP_Z - 0.01 below the grasp point) with the
    # socket's (2 cm high, SOCKET_GRASP_Z - 0.02 below).
    right_meet = INSERTION_MEET + [0, 0, (PEG_GRASP_Z - 0.01) - (SOCKET_GRASP_Z - 0.02)]
    w = Waypoint
    right = [
        w(0, start["right"][0], start["right"][1], 0.0),
        w(100, peg + [0, 0, 0.10], DOWN_RIGHT, 1.0),
        w(140, peg, DOWN_RIGHT, 1.0),
        w(170, peg, DOWN_RIGHT, 0.0),
        w(185, peg, DOWN_RIGHT, 0.0),
        w(215, peg + [0, 0, 0.10], DOWN_RIGHT, 0.0),
        w(270, right_meet + [0.15, 0, 0], DOWN_RIGHT, 0.0),
        w(290, right_meet + [0.15, 0, 0], DOWN_RIGHT, 0.0),
        w(350, right_meet + [0.03, 0, 0], DOWN_RIGHT, 0.0),
        w(HORIZON, right_meet + [0.03, 0, 0], DOWN_RIGHT, 0.0),
    ]
    left = [
        w(0, start["left"][0], start["left"][1], 0.0),
        w(100, socket + [0, 0, 0.10], DOWN_LEFT, 1.0),
        w(140, socket, DOWN_LEFT, 1.0),
        w(170, socket, DOWN_LEFT, 0.0),
        w(185, socket, DOWN_LEFT, 0.0),
        w(215, socket + [0, 0, 0.10], DOWN_LEFT, 0.0),
        w(270, INSERTION_MEET + [-0.06, 0, 0], DOWN_LEFT, 0.0),
        w(HORIZON, INSERTION_MEET + [-0.06, 0, 0], DOWN_LEFT, 0.0),
    ]
    return WaypointPlan(left, right)


def route_for_seed(seed: int) -> str:
    """The two-route expert's route for an episode: a fair coin drawn from the seed alone, so a
    seed names the same route on every machine."""
    return ROUTES[int(np.random.default_rng([int(seed), 24]).integers(2))]


def plan_for(task: str, object_pose: np.ndarray, start: dict, route: str | None = None) -> WaypointPlan:
    """The plan of `task` for an object pose (transfer: cube [7]; insertion: peg [7] + socket [7])."""
    if task == "transfer_cube":
        if route is None:
            return transfer_cube_plan(object_pose[:3], start)
        return transfer_cube_plan(object_pose[:3], start, ROUTE_MEETS[route], ROUTE_DELAYS[route])
    if task == "insertion":
        if route is not None:
            raise ValueError(f"the insertion expert has one route, got route={route!r}")
        return insertion_plan(object_pose[:3], object_pose[7:10], start)
    raise ValueError(f"unknown ALOHA task {task!r}; valid: {list(TASKS)}")


class ArmKinematics:
    """Inverse kinematics of the two 6-joint arms of one MuJoCo model (a scratch copy of its data)."""

    ARM_DOFS = {"left": slice(0, 6), "right": slice(8, 14)}

    def __init__(self, model) -> None:
        import mujoco

        self._mujoco, self.model = mujoco, model
        self.data = mujoco.MjData(model)
        self.body = {arm: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, f"vx300s_{arm}/gripper_link")
                     for arm in self.ARM_DOFS}

    def grasp_pose(self, qpos: np.ndarray, arm: str) -> tuple[np.ndarray, np.ndarray]:
        """(grasp point (3,), rotation (3, 3)) of `arm` at joint positions `qpos` [nq]."""
        self.data.qpos[:] = qpos
        self._mujoco.mj_kinematics(self.model, self.data)
        return self._pose(arm)

    def _pose(self, arm: str) -> tuple[np.ndarray, np.ndarray]:
        rotation = self.data.xmat[self.body[arm]].reshape(3, 3).copy()
        return self.data.xpos[self.body[arm]] + GRASP_OFFSET * rotation[:, 0], rotation

    def solve(self, qpos: np.ndarray, arm: str, point: np.ndarray, rotation: np.ndarray,
              iterations: int = 60, damping: float = 1e-4) -> np.ndarray:
        """qpos [nq] with `arm`'s 6 joints moved so its grasp point and orientation reach the
        targets (damped least squares from `qpos`, joint limits respected)."""
        mj, m, d = self._mujoco, self.model, self.data
        dofs = self.ARM_DOFS[arm]
        d.qpos[:] = qpos
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for _ in range(iterations):
            mj.mj_kinematics(m, d)
            mj.mj_comPos(m, d)
            here, current = self._pose(arm)
            rot_error = 0.5 * sum(np.cross(current[:, i], rotation[:, i]) for i in range(3))
            error = np.concatenate([point - here, rot_error])
            if np.linalg.norm(error) < 1e-5:
                break
            mj.mj_jac(m, d, jacp, jacr, here, self.body[arm])
            jac = np.concatenate([jacp[:, dofs], jacr[:, dofs]])
            step = jac.T @ np.linalg.solve(jac @ jac.T + damping * np.eye(6), error)
            d.qpos[dofs] = np.clip(d.qpos[dofs] + step, m.jnt_range[dofs, 0], m.jnt_range[dofs, 1])
        return d.qpos.copy()


def joint_trajectory(model, qpos0: np.ndarray, plan: WaypointPlan, steps: int = HORIZON) -> np.ndarray:
    """float32 [steps, 14]: per step, the IK joint targets of both arms for the plan's poses at
    step t+1 (where the arm should be after the action) and the commanded openings."""
    kinematics = ArmKinematics(model)
    qpos, actions = np.array(qpos0, dtype=np.float64), []
    for t in range(steps):
        row = []
        for arm in ("left", "right"):
            point, rotation, opening = plan.at(arm, t + 1)
            qpos = kinematics.solve(qpos, arm, point, rotation)
            row.extend([*qpos[ArmKinematics.ARM_DOFS[arm]], opening])
        actions.append(row)
    return np.asarray(actions, dtype=np.float32)


def start_poses(model, qpos0: np.ndarray) -> dict:
    """{arm: (grasp point, rotation)} at the reset joint positions."""
    kinematics = ArmKinematics(model)
    return {arm: kinematics.grasp_pose(qpos0, arm) for arm in ("left", "right")}
