"""drifting-vla's one-step policy as a LeRobot policy plugin: `--policy.type=drifting`.

LeRobot imports installed distributions named `lerobot_policy_*` at start-up
(`register_third_party_plugins`); importing this package registers the config type, and LeRobot's
factory finds `DriftingPolicy` and `make_drifting_pre_post_processors` beside it by module name.
See docs/lerobot.md of the drifting-vla repository.
"""

from lerobot_policy_drifting.configuration_drifting import DriftingConfig
from lerobot_policy_drifting.modeling_drifting import DriftingPolicy
from lerobot_policy_drifting.processor_drifting import make_drifting_pre_post_processors

__all__ = ["DriftingConfig", "DriftingPolicy", "make_drifting_pre_post_processors"]
