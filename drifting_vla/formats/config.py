"""The schema of every config group: the keys a run, an evaluation, a server and an ONNX export
take, their defaults and their ranges, each declared once, here.

    RunConfig                drifting-train: seed, device, plugins, data.* (DATA_SCHEMAS[data.name]),
                             model.* (ModelConfig; its encoders by name, VISION_SCHEMAS and LANGUAGE_SCHEMAS),
                             training.* (TrainingConfig)
    EvalScriptConfig         drifting-eval (configs/eval.yaml)
    ServeScriptConfig        drifting-serve (configs/serve.yaml)
    ExportOnnxScriptConfig   drifting-export-onnx (configs/export_onnx.yaml)

The base YAML files restate these defaults beside their reasons and a test keeps the two equal
(tests/test_config_defaults.py). The keys an evaluation executes with (`ExecutionConfig`) are
shared by `training.eval` and drifting-eval, and the server's (`ServerConfig`) by the server and
drifting-serve. A field's range or choices ride with its declaration (`setting(ge=1)`,
formats/settings.py); checking a whole config, and the settings that must agree across groups, is
formats/validation.py's.

A dataset or an encoder a plugin registers declares its own keys the same way, a subclass of
`DataConfig` (`EncoderConfig`) with `setting()` fields, and hands it to its one registration call,
`register_dataset(name, schema=...)` (drifting_vla/data/registry.py) or
`register_vision_encoder(name, schema=...)` (`register_language_encoder`, drifting_vla/models/),
which writes it into the registry here: validation reads it without importing the builders. One
that declares none is checked on the keys all of them share, and its other keys are its
builder's. The built-in datasets' and encoders' schemas are declared here, so that a config is
checked in full whichever packages the program has imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drifting_vla.formats.settings import setting
from drifting_vla.specs import COMPONENT_KINDS

SAMPLERS = (None, "ddim", "ddpm")
EXECUTION_MODES = ("chunk", "ensemble")

# ----------------------------------------------------------------------------------------------
# training.*


@dataclass(kw_only=True)
class PositivesConfig:
    source: str = setting("self", choices=("self", "queue", "neighbours"))
    k: int = setting(4, ge=1)
    weight: float = setting(1.0, gt=0)
    queue_size: int = setting(256, ge=1)
    exclude_own_episode: bool = True


@dataclass(kw_only=True)
class DriftingConfig:
    temperatures: list[float] = setting(factory=lambda: [0.02, 0.05, 0.2, 1.0], gt=0, min_items=1)
    affinity_floor: float = setting(1e-6, ge=0)
    grouping: str = setting("chunk", choices=("chunk", "timestep", "dimension"))
    positives: PositivesConfig = setting(factory=PositivesConfig)


@dataclass(kw_only=True)
class FlowMatchingConfig:
    time_distribution: str = setting("beta", choices=("uniform", "beta"))
    beta_alpha: float = setting(1.5, gt=0)


@dataclass(kw_only=True)
class DiffusionConfig:
    num_train_timesteps: int = setting(100, ge=2)
    prediction_type: str = setting("epsilon", choices=("epsilon", "sample"))
    clip_sample: bool = True


@dataclass(kw_only=True)
class AugmentationConfig:
    random_shift: int = setting(0, ge=0)  # pixels of DrQ random shift; 0: off (it lost at the embedded budget)


@dataclass(kw_only=True)
class DistributedConfig:
    strategy: str = setting("ddp", choices=("ddp", "fsdp"))
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"))


@dataclass(kw_only=True)
class ExecutionConfig:
    """How a policy executes its chunks in closed loop and how it samples them: the keys that
    `training.eval` and the evaluation script (configs/eval.yaml) share."""

    execution: str = setting("chunk", choices=EXECUTION_MODES)
    execute_steps: int | None = setting(None, ge=1)
    ensemble_decay: float = setting(0.01, ge=0)
    nfe: int | None = setting(None, ge=1)
    sampler: str | None = setting(None, choices=SAMPLERS)


@dataclass(kw_only=True)
class EvalConfig(ExecutionConfig):
    every: int = setting(0, ge=0)
    at_end: bool = True
    episodes: int = setting(25, ge=1)
    workers: int = setting(8, ge=1)
    videos_per_task: int = setting(2, ge=0)


@dataclass(kw_only=True)
class PanelSchedule:
    frequency: int = setting(0, ge=0)


PANEL_FREQUENCIES = {
    "a1_drifting_field": 1000, "a2_lambda_v_trend": 500, "a3_prediction_vs_ground_truth": 1000, "a4_error_radar": 1000,
    "a5_loss_and_drift_norms": 500, "b1_action_distributions": 2000, "b2_error_heatmap": 2000,
    "b4_end_effector_trajectory": 2000, "c1_sample_transport": 2000, "c2_mode_coverage": 5000,
}
"""Steps between renders of each training panel (docs/training_panels.md): a panel costs 0.2-0.7 s
of CPU on rank 0, so the cheap trend panels come most often."""


@dataclass(kw_only=True)
class WandbConfig:
    mode: str = setting("offline", choices=("online", "offline", "disabled"))
    project: str = "drifting-vla"
    name: str | None = None
    visualizations: dict[str, PanelSchedule] = setting(
        factory=lambda: {name: PanelSchedule(frequency=steps) for name, steps in PANEL_FREQUENCIES.items()})


@dataclass(kw_only=True)
class TrainingConfig:
    """Every default here is that of GPU training of the full model (dit_b2); configs/training/baseline.yaml restates them
    with their reasons (tests/test_config_defaults.py keeps the two equal) and the presets
    (configs/training/quickstart.yaml) override some."""

    objective: str = setting("drifting")  # a name in drifting_vla.objectives.OBJECTIVES (build_objective checks it)
    max_steps: int = setting(100000, ge=1)
    batch_size: int = setting(64, ge=1)
    num_samples: int = setting(8, ge=1)
    grad_accum_steps: int = setting(1, ge=1)
    learning_rate: float = setting(1e-4, gt=0)
    weight_decay: float = setting(0.05, ge=0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.95], ge=0, lt=1, min_items=2, max_items=2)
    warmup_steps: int = setting(1000, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    grad_clip: float = setting(1.0, gt=0)
    ema_decay: float = setting(0.9999, ge=0, lt=1)
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"))
    compile: bool = False
    num_threads: int | None = setting(None, ge=1)
    nan_policy: str = setting("stop", choices=("stop", "skip"))
    max_skipped_fraction: float = setting(0.05, ge=0, le=1)
    drifting: DriftingConfig = setting(factory=DriftingConfig)
    flow_matching: FlowMatchingConfig = setting(factory=FlowMatchingConfig)
    diffusion: DiffusionConfig = setting(factory=DiffusionConfig)
    log_every: int = setting(50, ge=1)
    val_every: int = setting(2000, ge=0)
    val_batches: int = setting(8, ge=1)
    checkpoint_every: int = setting(5000, ge=1)
    keep_checkpoints: int = setting(3, ge=1)
    resume: str | None = None
    feature_cache: bool = False
    augmentation: AugmentationConfig = setting(factory=AugmentationConfig)
    distributed: DistributedConfig = setting(factory=DistributedConfig)
    eval: EvalConfig = setting(factory=EvalConfig)
    wandb: WandbConfig = setting(factory=WandbConfig)


# ----------------------------------------------------------------------------------------------
# data.*


@dataclass(kw_only=True)
class ActionComponentConfig:
    name: str = setting()
    kind: str = setting(choices=COMPONENT_KINDS)
    dim: int = setting(ge=1)


@dataclass(kw_only=True)
class ActionSpecConfig:
    components: list[ActionComponentConfig] = setting()


@dataclass(kw_only=True)
class SeedRange:
    start: int = setting(ge=0)
    count: int = setting(ge=1)


MAX_IMAGE_SIZE = 1024
"""The largest data.image_size: [B, V, 3, S, S] uint8 batches and the encoders' patch grids grow with
S^2 (a 1024 px, 2-camera batch of 64 is 400 MB before any network); the models here are trained at
32..224 px. Past it a typo (image_size=22400) would fail far from the key, in a framebuffer or in memory."""


@dataclass(kw_only=True)
class DataConfig:
    """The keys every dataset shares (and the simulator settings evaluation reads)."""

    name: str = setting()
    tasks: list[str] | None = setting(None, min_items=1)
    cameras: list[str] = setting(min_items=1, unique=True)
    image_size: int | None = setting(None, ge=1, le=MAX_IMAGE_SIZE)
    proprio_dim: int = setting(ge=1)
    horizon: int = setting(ge=1)
    n_obs_steps: int = setting(1, ge=1)  # observations per sample: the current one and n-1 before it
    action_spec: ActionSpecConfig = setting()
    control_hz: float | None = setting(None, gt=0)
    max_episode_steps: int | None = setting(None, ge=1)
    train_seeds: SeedRange | None = None
    eval_seeds: SeedRange | None = None
    holdout_every: int | None = setting(None, ge=2)  # every Nth episode is the val split, held out of train
    num_workers: int = setting(0, ge=0)
    skip_corrupt: bool = False
    instructions: list[str] | None = None  # learned task embeddings' vocabulary (the trainer fills it in)
    simulator: Any = None  # null, auto, or a registered simulator's data config (drifting_vla.envs)


@dataclass(kw_only=True)
class MetaWorldDataConfig(DataConfig):
    tasks: list[str] = setting(min_items=1)
    image_size: int = setting(ge=1, le=MAX_IMAGE_SIZE)
    max_episode_steps: int = setting(ge=1)
    train_seeds: SeedRange = setting()
    eval_seeds: SeedRange = setting()
    control_hz: float = setting(80.0, gt=0)  # MuJoCo's 2.5 ms timestep x frame_skip 5
    root: str | None = "~/.cache/drifting_vla/metaworld"  # null: this default
    privileged_state: bool = False
    observe_goal: bool = False
    expert: str = setting("stock", choices=("stock", "routes"))
    collect_workers: int = setting(2, ge=1)
    holdout_every: int = setting(10, ge=2)


@dataclass(kw_only=True)
class AlohaDataConfig(DataConfig):
    tasks: list[str] = setting(min_items=1)
    image_size: int = setting(64, ge=1, le=MAX_IMAGE_SIZE)
    max_episode_steps: int = setting(400, ge=1)  # ACT's and LeRobot's evaluation length (8 s)
    train_seeds: SeedRange = setting()
    eval_seeds: SeedRange = setting()
    control_hz: float = setting(50.0, gt=0)  # gym-aloha's DT of 0.02 s
    root: str | None = "~/.cache/drifting_vla/aloha"
    render_mode: str = setting("fast", choices=("fast", "faithful"))
    expert: str = setting("scripted", choices=("scripted", "routes"))
    collect_workers: int = setting(2, ge=1)
    holdout_every: int = setting(10, ge=2)


@dataclass(kw_only=True)
class RLBenchDataConfig(DataConfig):
    root: str = setting()
    tasks: list[str] = setting(min_items=1)
    cache_dir: str | None = setting()  # null: decode the PNGs at every read
    repo_id: str | None = "hqfang/RLBench-18-Tasks"
    split: str = setting("train", choices=("train", "val", "test"))
    image_size: int | None = setting(128, ge=1, le=MAX_IMAGE_SIZE)  # PerAct's frames are 128 px
    control_hz: float | None = setting(20.0, gt=0)  # CoppeliaSim's 50 ms step
    keyframes: bool = True
    max_episodes_per_task: int | None = setting(None, ge=1)
    control: str | None = setting(None, choices=(None, "planner", "ik"))
    workspace_bounds: list[list[float]] | None = None
    ignore_collisions: bool = False
    num_workers: int = setting(8, ge=0)
    eval_seeds: SeedRange | None = setting(factory=lambda: SeedRange(start=0, count=25))  # PerAct's 25 per task


@dataclass(kw_only=True)
class LeRobotDataConfig(DataConfig):
    root: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    image_size: int = setting(64, ge=1, le=MAX_IMAGE_SIZE)
    state_key: str = "observation.state"
    action_key: str = "action"
    # null: read from the dataset's meta/info.json when the run starts (drifting_vla/data/lerobot_features.py)
    cameras: list[str] | None = setting(None, min_items=1, unique=True)
    proprio_dim: int | None = setting(None, ge=1)
    action_spec: ActionSpecConfig | None = None
    holdout_every: int = setting(10, ge=2)
    num_workers: int = setting(2, ge=0)
    simulator: Any = "auto"


DATA_SCHEMAS = {"metaworld": MetaWorldDataConfig, "aloha": AlohaDataConfig, "rlbench": RLBenchDataConfig,
                "lerobot": LeRobotDataConfig}
"""data.name -> the dataset's schema; `register_dataset(name, schema=...)` adds a plugin's."""

# ----------------------------------------------------------------------------------------------
# model.*


@dataclass(kw_only=True)
class EncoderConfig:
    name: str = setting()


@dataclass(kw_only=True)
class CNNVisionConfig(EncoderConfig):
    input_size: int = setting(64, ge=1)
    width: int = setting(32, ge=1)
    num_stages: int = setting(3, ge=1)
    groups: int = setting(8, ge=1)


@dataclass(kw_only=True)
class Dinov2VisionConfig(EncoderConfig):
    name_or_path: str = setting()
    revision: str | None = None
    input_size: int = setting(224, ge=1)
    arch: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ClipLanguageConfig(EncoderConfig):
    name_or_path: str = setting()
    revision: str | None = None
    tokenizer: str | None = None
    max_length: int = setting(77, ge=1)
    arch: dict[str, Any] | None = None


@dataclass(kw_only=True)
class MiniLMLanguageConfig(EncoderConfig):
    name_or_path: str | None = None
    revision: str | None = None
    max_length: int = setting(32, ge=1)


@dataclass(kw_only=True)
class TaskEmbeddingLanguageConfig(EncoderConfig):
    dim: int = setting(256, ge=1)
    instructions: list[str] | None = None


VISION_SCHEMAS = {"cnn": CNNVisionConfig, "dinov2": Dinov2VisionConfig}
"""model.vision.name -> the encoder's schema; `register_vision_encoder(name, schema=...)` adds a plugin's."""

LANGUAGE_SCHEMAS = {"clip": ClipLanguageConfig, "minilm": MiniLMLanguageConfig, "task_embedding": TaskEmbeddingLanguageConfig}
"""model.language.name -> the encoder's schema; `register_language_encoder(name, schema=...)` adds a plugin's."""


@dataclass(kw_only=True)
class FusionConfig:
    num_layers: int = setting(2, ge=1)
    num_tokens: int = setting(32, ge=1)


@dataclass(kw_only=True)
class DiTConfig:
    hidden_size: int = setting(ge=1)
    depth: int = setting(ge=1)
    num_heads: int = setting(ge=1)
    mlp_ratio: float = setting(4.0, gt=0)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "custom"
    pretrained: bool = True
    vision: Any = setting()  # checked against its encoder's schema (VISION_SCHEMAS)
    language: Any = setting()  # (LANGUAGE_SCHEMAS)
    fusion: FusionConfig = setting(factory=FusionConfig)
    dit: DiTConfig = setting()
    decoder_hidden_size: int | None = setting(None, ge=1)
    noise_dim: int | None = setting(None, ge=1)


# ----------------------------------------------------------------------------------------------
# A run, an evaluation, a server


@dataclass(kw_only=True)
class RunConfig:
    seed: int = setting(0, ge=0)
    device: str = "auto"
    run_dir: str | None = None
    plugins: list[str] = setting(factory=list)
    model: Any = setting()  # ModelConfig
    data: Any = setting()  # DATA_SCHEMAS[data.name]
    training: Any = setting(factory=dict)  # TrainingConfig


@dataclass(kw_only=True)
class EvalSeedsConfig:
    """The env seeds scripts/simulate_eval.py evaluates on, start .. start + count - 1: both set,
    or neither (the checkpoint's data.eval_seeds)."""

    start: int | None = setting(None, ge=0)
    count: int | None = setting(None, ge=1)


@dataclass(kw_only=True)
class EvalScriptConfig(ExecutionConfig):
    checkpoint: str | None = None
    remote: str | None = None
    remote_token: str | None = None
    seed: int | None = setting(None, ge=0)
    tasks: list[str] | None = None
    seeds: EvalSeedsConfig = setting(factory=EvalSeedsConfig)
    episodes: int | None = setting(None, ge=1)
    workers: int = setting(2, ge=1)
    output: str = setting()
    videos_per_task: int = setting(2, ge=0)
    max_episode_steps: int | None = setting(None, ge=1)
    device: str = "cpu"
    num_threads: int | None = setting(None, ge=1)
    progress: bool = True
    plugins: list[str] = setting(factory=list)
    wandb_mode: str = setting("disabled", choices=("disabled", "offline", "online"))
    wandb_project: str = "drifting-vla"


@dataclass(kw_only=True)
class ServerConfig:
    """How the policy server listens, authenticates and batches (drifting_vla/serving/server.py);
    the serve script's config (configs/serve.yaml) is this plus what to load."""

    host: str = "127.0.0.1"  # loopback unless told otherwise; anything wider should set a token
    port: int = setting(8000, ge=0, le=65535)  # 0: any free port (read `PolicyServer.port` once ready)
    token: str | None = None  # clients send `Authorization: Bearer <token>`; null or empty: none
    max_batch: int = setting(16, ge=1)  # requests per forward pass
    max_wait_ms: float = setting(2.0, ge=0)  # how long the first request of a batch waits for company
    max_queue: int = setting(64, ge=1)  # requests waiting beyond this are answered "busy" at once
    max_message_mb: float = setting(16.0, gt=0)  # larger frames close that connection (code 1009)
    max_instruction_chars: int = setting(1000, ge=1)  # longer: "too_large" (tokenizing megabytes stalls the model thread)
    max_image_pixels: int = setting(2048 * 2048, ge=1)  # per image (H x W); larger: "too_large"
    decode_threads: int = setting(2, ge=1)  # frames unpacked, checked and resized off the event loop
    control_hz: float | None = setting(None, gt=0)  # None: the checkpoint's data.control_hz

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


@dataclass(kw_only=True)
class ServeScriptConfig(ServerConfig):
    checkpoint: str = setting()
    instruction_cache: int = setting(1024, ge=1)  # instructions kept encoded, least recently used dropped first
    nfe: int | None = setting(None, ge=1)
    sampler: str | None = setting(None, choices=SAMPLERS)
    device: str = "cpu"
    num_threads: int | None = setting(None, ge=1)
    plugins: list[str] = setting(factory=list)


@dataclass(kw_only=True)
class ExportOnnxScriptConfig:
    """scripts/export_onnx.py's keys (configs/export_onnx.yaml)."""

    checkpoint: str = setting()
    output: str = setting()
    instructions: list[str] = setting(factory=list)
    nfe: int | None = setting(None, ge=1)
    sampler: str | None = setting(None, choices=SAMPLERS)
    verify: bool = True
    plugins: list[str] = setting(factory=list)
