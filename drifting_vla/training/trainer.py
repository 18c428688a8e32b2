"""The training loop. It reads like the algorithm:

    for step in range(start, max_steps):
        batch   = next(loader)                        # uint8 images, raw actions, on the device
        actions = normalize(batch.actions)            # the normalizer is saved with every checkpoint
        inputs  = objective.training_inputs(global batch, seed, step)[rank]   # noise, t: same whatever the world size
        images  = random_shift(images, offsets(global batch, seed, step)[rank])   # training batches only
        out     = objective(model, obs, actions, inputs)  # drifting: G chunks per observation, one drift problem each
        out.loss.backward(); clip; optimizer.step(); scheduler.step(); ema.update()
        log / validate / panels / checkpoint / evaluate in simulation, each at its cadence

Distributed training is plain torchrun + DDP: rank r takes slice r of each global batch (data and
noise), the drift statistics are all-reduced inside DriftingLoss, DDP averages the gradients, so a
W-rank run follows the same trajectory as one process on the global batch. Rank 0 alone logs,
renders panels, writes checkpoints and runs the simulation.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from drifting_vla.data.collate import collate_samples
from drifting_vla.data.interface import RecordsSimulator
from drifting_vla.data.normalization import Normalizer, dataset_stats
from drifting_vla.data.registry import build_dataset, complete_data_config, prepare_dataset
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.sampler import ResumableBatchSampler
from drifting_vla.distributed import (
    all_reduce_sum,
    full_tensor,
    init_distributed,
    shard_model,
)
from drifting_vla.envs import NO_SIMULATOR, checked_env_import_path, simulation_config
from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.formats.checkpoint import (
    checkpoint_dir_name,
    find_latest_valid_checkpoint,
    prune_checkpoints,
    remove_stale_partials,
    resolve_checkpoint,
)
from drifting_vla.formats.files import FileLock, write_atomic
from drifting_vla.formats.validation import (
    resume_conflicts,
    training_config,
    validate_run_config,
    with_data_defaults,
)
from drifting_vla.inference.card import export_description
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.logging.trajectory_video import TRAJECTORY_VIDEO_KEY
from drifting_vla.logging.visualizations import PANELS, MetricHistory, PanelInputs, due_panels
from drifting_vla.logging.wandb_logger import create_run_logger
from drifting_vla.models import build_model, parameter_table
from drifting_vla.objectives.methods import build_objective
from drifting_vla.precision import autocast_dtype
from drifting_vla.specs import ActionSpec
from drifting_vla.training.augmentation import random_shift, shift_offsets
from drifting_vla.training.checkpoint import (
    FULL_STATE,
    capture_rng_state,
    gather_training_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from drifting_vla.training.ema import EMA
from drifting_vla.training.feature_cache import cache_vision_features
from drifting_vla.training.optimizer import OptimizerConfig, build_optimizer, build_scheduler


class Evaluator(Protocol):
    """Scores a policy in closed loop and writes what it saw under `output_dir`; the training loop
    is handed one (`drifting_vla.evaluation.SimulationEvaluator`) rather than importing evaluation."""

    def __call__(self, policy: DriftingPolicy, output_dir: Path): ...


class Trainer:
    def __init__(self, cfg: DictConfig, evaluator: Evaluator | None = None) -> None:
        """`evaluator` scores the EMA policy when `training.eval` asks for it (at the end, every N
        steps); a config that asks with a simulator but no evaluator is refused before any data is read."""
        validate_run_config(cfg)  # every group, before any data is read
        self.cfg = cfg  # what is saved with each checkpoint; the training loop reads the typed `training`
        self.training = t = training_config(cfg.training)
        self.objective = build_objective(t)
        self.eval_nfe, self.eval_sampler = self.objective.resolve(t.eval.nfe, t.eval.sampler)
        evaluates = t.eval.at_end or t.eval.every > 0
        self.ctx = init_distributed(t.distributed.backend, str(cfg.device))
        self.device = self.ctx.device
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(int(cfg.seed))
        if cfg.get("run_dir") is None:
            raise ValueError("the config has no run_dir: set it (the override run_dir=runs/my_run); scripts/train.py "
                             "sets it to Hydra's run directory")
        self.run_dir = Path(str(cfg.run_dir))
        self.checkpoints_dir = self.run_dir / "checkpoints"
        if self.ctx.is_main:  # one process collects or fetches; the others wait, then read
            prepare_dataset(cfg.data)
        self._barrier()
        with _unlocked(cfg):  # keys the dataset answers itself (data=lerobot: cameras, sizes, action layout)
            cfg.data.update(complete_data_config(cfg.data))
        validate_run_config(cfg)  # the keys filled in, too
        self.action_spec = ActionSpec.from_config(cfg.data.action_spec)
        self.train_set = build_dataset(cfg.data, "train")
        self.val_set = build_dataset(cfg.data, "val") if t.val_every else None
        if with_data_defaults(cfg.data).get("simulator") == "auto":  # recorded by the dataset (a LeRobot export of sim demos)
            if not isinstance(self.train_set, RecordsSimulator):
                raise ValueError(f"data.simulator=auto, but a {cfg.data.name} dataset records no simulator: set "
                                 "data.simulator to null or to a registered simulator's data config")
            with _unlocked(cfg):
                cfg.data.simulator = self.train_set.simulator()
        simulator = simulation_config(cfg.data)
        if evaluates and simulator is not None:  # an unknown simulator or task, or no seeds to run, fail now, not after training
            checked_env_import_path(simulator, simulator["tasks"])
            from_simulator = "eval_seeds" in (cfg.data.get("simulator") or {})
            evaluation_seeds(simulator, t.eval.episodes, range_key=f"data.{'simulator.' if from_simulator else ''}eval_seeds")
            if evaluator is None:
                raise ValueError(
                    "training.eval asks for closed-loop evaluation (at_end or every) but the Trainer was given no "
                    "evaluator: pass Trainer(cfg, evaluator=drifting_vla.evaluation.SimulationEvaluator(cfg)) as "
                    "drifting-train does, or set training.eval.at_end=false training.eval.every=0"
                )
        self.evaluator = evaluator
        self.normalizer = Normalizer(dataset_stats(self.train_set), self.action_spec, int(cfg.data.proprio_dim)).to(self.device)
        if str(cfg.model.language.name) == "task_embedding":
            with _unlocked(cfg):
                cfg.data.instructions = self.train_set.all_instructions()
        self.train_set, self.val_set = self.objective.training_datasets(self.train_set, self.val_set)

        self.model = build_model(cfg).to(self.device)
        self.random_shift = t.augmentation.random_shift
        if t.feature_cache:  # before sharding: the backbone runs alone, outside the model's forward
            self.train_set = cache_vision_features(self.train_set, self.model.vision_encoder, self.device)
            if self.val_set is not None:
                self.val_set = cache_vision_features(self.val_set, self.model.vision_encoder, self.device)
        self.sharded = t.distributed.strategy == "fsdp" and self.ctx.world_size > 1
        if self.sharded:
            shard_model(self.model)
        if t.compile:
            self.model.dit.compile()  # in place: parameter names (and checkpoints) stay the same
        self.ema = EMA(self.model, t.ema_decay)
        opt_cfg = OptimizerConfig(
            learning_rate=t.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.betas),
            warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio,
        )
        self.optimizer = build_optimizer(self.model, opt_cfg)
        self.scheduler = build_scheduler(self.optimizer, opt_cfg)
        self.network = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.ctx.world_size > 1 and not self.sharded else self.model
        )
        self.autocast_dtype = autocast_dtype(t.precision, self.device)

        self.sampler = ResumableBatchSampler(
            len(self.train_set), t.batch_size, seed=int(cfg.seed), rank=self.ctx.rank, world_size=self.ctx.world_size
        )
        self.step, self.skipped_steps, self.batches_consumed = 0, 0, 0
        self.history = MetricHistory()
        if self.val_set is not None and bool(cfg.data.get("skip_corrupt", False)):
            self._check_validation_readable()
        # The run directory is taken (one run at a time), read (resume), and only then written: a
        # refused resume leaves it as it was. fit() gives it back.
        self.run_lock = FileLock(self.run_dir / RUN_LOCK_FILE, f"the run directory {self.run_dir}", RUN_DIR_TAKEN)
        if self.ctx.is_main:
            self.run_lock.acquire()
        try:
            if self.ctx.is_main:  # the space a write cut short (a full disk) holds, before anything is written
                remove_stale_partials(self.checkpoints_dir)
            if t.resume:
                self._resume(t.resume)
            self.logger = create_run_logger(
                self.run_dir, rank=self.ctx.rank, mode=t.wandb.mode, project=t.wandb.project,
                run_name=t.wandb.name, config=OmegaConf.to_container(cfg, resolve=True),
            )
            if self.ctx.is_main:
                write_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        except BaseException:
            self.run_lock.release()
            raise
        if self.ctx.is_main:
            print(parameter_table(self.model), flush=True)

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> dict | None:
        """Train to `training.max_steps`, then evaluate in simulation; returns the eval summary.
        The run directory is given back at the end, also when training fails."""
        try:
            return self._fit()
        finally:
            self.run_lock.release()

    def _fit(self) -> dict | None:
        t = self.training
        self.sampler_start = self.sampler.state_dict()
        batches = iter(self._loader(self.train_set, self.sampler))
        meter = _Throughput()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.ctx.is_main)
        while self.step < t.max_steps:
            meter.start()
            step_metrics, last = self._train_step(batches, meter)
            self.step += 1
            meter.stop(t.batch_size * t.grad_accum_steps * self.ctx.world_size)
            bar.update(1)
            lambda_v = f"{step_metrics['train/lambda_V']:.4f}" if "train/lambda_V" in step_metrics else "-"
            bar.set_postfix(loss=f"{step_metrics['train/loss']:.3f}", lambda_V=lambda_v,
                            samples_s=f"{meter.samples_per_second:.0f}", data_wait=f"{meter.data_wait_share:.0%}", refresh=False)
            self._after_step(step_metrics, last, meter)
        bar.close()
        if self.skipped_steps >= self.step:
            raise FloatingPointError(
                f"all {self.step} steps were skipped for non-finite values (training.nan_policy=skip): the run trained "
                "nothing, so no final checkpoint is written. Check the data and training.learning_rate; "
                "training.nan_policy=stop names the first bad step and batch."
            )
        self._save_checkpoint()  # before evaluating: a failed evaluation never costs the weights
        summary = self._evaluate_in_sim(final=True) if t.eval.at_end else None
        self.logger.close()
        return summary

    def _train_step(self, batches, meter: _Throughput) -> tuple[dict[str, float], tuple]:
        t = self.training
        accum = t.grad_accum_steps
        totals: dict[str, torch.Tensor] = defaultdict(float)
        for micro in range(accum):
            with meter.waiting_for_data():
                batch = next(batches)
            self.batches_consumed += 1
            obs, actions = self._to_device(batch)
            generator = self._generator(self.step * accum + micro)
            inputs = self._training_inputs(generator, len(actions))
            trained_on = obs  # the panels and the returned batch keep the frames as the policy sees them
            if self.random_shift:  # after the objective's draws, which stay what they were without it
                offsets = shift_offsets(len(actions) * self.ctx.world_size, obs["images"].shape[-4], self.random_shift, generator)
                trained_on = {**obs, "images": random_shift(obs["images"], offsets[self._rank_rows(len(actions))], self.random_shift)}
            # One context for forward and backward: DDP's no_sync() can be entered only once.
            with self._gradient_sync(last_micro_batch=micro == accum - 1):
                with self._autocast():
                    out = self.objective(self.network, trained_on, actions, inputs)
                if not self._is_finite(out.loss, "loss", batch):
                    return self._skip_step(), (obs, actions)
                (out.loss / accum).backward()
            for key, value in out.metrics.items():
                totals[key] = totals[key] + value.float() / accum
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), t.grad_clip))
        if not self._is_finite(grad_norm, "gradient norm", batch):
            return self._skip_step(), (obs, actions)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        metrics = {f"train/{k}": float(v) for k, v in totals.items()}
        metrics.update({"train/grad_norm": float(grad_norm), "train/lr": self.scheduler.get_last_lr()[0]})
        return metrics, (obs, actions)

    def _after_step(self, metrics: dict[str, float], last: tuple, meter: _Throughput) -> None:
        t, step = self.training, self.step
        if step % t.log_every == 0 or step == t.max_steps:
            metrics.update({"perf/samples_per_s": meter.samples_per_second, "perf/data_wait_share": meter.data_wait_share,
                            "train/skipped_steps": self.skipped_steps})
            self._log(self._mean_over_ranks(metrics))
        if self.val_set is not None and t.val_every and step % t.val_every == 0:
            self._log(self.validate())
        self._render_panels(last)  # every rank samples (collective under FSDP); rank 0 alone logs
        if step % t.checkpoint_every == 0 and step < t.max_steps:
            self._save_checkpoint()
        if t.eval.every and step % t.eval.every == 0 and step < t.max_steps:
            self._evaluate_in_sim(final=False)

    # ------------------------------------------------------------------------------ pieces
    def _to_device(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Images stay uint8 until the device; proprio and actions are normalized there."""
        obs = {
            "images": batch["images"].to(self.device, non_blocking=True),
            "proprio": self.normalizer.normalize("proprio", batch["proprio"].to(self.device, non_blocking=True).float()),
            "instruction": batch["instruction"],
            "task": batch["task"],
            "action_mask": batch["action_mask"].to(self.device, non_blocking=True),
        }
        if "vision_features" in batch:
            obs["vision_features"] = batch["vision_features"].to(self.device, non_blocking=True)
        if "neighbour_actions" in batch:  # drifting's neighbour positives, scaled like the expert chunk
            obs["neighbour_actions"] = self.normalizer.normalize("actions", batch["neighbour_actions"].to(self.device, non_blocking=True).float())
        actions = self.normalizer.normalize("actions", batch["actions"].to(self.device, non_blocking=True).float())
        return obs, actions

    def _generator(self, draw: int) -> torch.Generator:
        """The CPU generator of random draw `draw` (negative for validation and panels)."""
        return torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + draw)

    def _training_inputs(self, generator: torch.Generator, local_batch: int) -> dict[str, torch.Tensor]:
        """The objective's random inputs (noise, times) for the GLOBAL batch from `generator`
        (`_generator(draw)`: seed and draw), sliced for this rank: results do not depend on the
        number of ranks, and a resumed run draws what the killed one would have."""
        inputs = self.objective.training_inputs(
            local_batch * self.ctx.world_size, self.model.horizon, self.model.noise_dim, generator
        )
        return {key: value[self._rank_rows(local_batch)].to(self.device) for key, value in inputs.items()}

    def _rank_rows(self, local_batch: int) -> slice:
        """This rank's rows of a global batch."""
        return slice(self.ctx.rank * local_batch, (self.ctx.rank + 1) * local_batch)

    def validation_generator(self, batch_index: int) -> torch.Generator:
        """The generator validation samples batch `batch_index` with (a policy given the same one
        draws the same chunks)."""
        return self._generator(-1 - batch_index)

    def _is_finite(self, value: torch.Tensor, what: str, batch: dict) -> bool:
        """Agreed across ranks. Under nan_policy=stop a non-finite value ends the run, naming the step."""
        finite = torch.isfinite(value.detach()).float()
        if self.ctx.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 1.0:
            return True
        if self.training.nan_policy == "stop":
            raise FloatingPointError(
                f"non-finite {what} ({value.item()}) at step {self.step} on a batch of tasks {sorted(set(batch['task']))}; "
                f"the run stops rather than train on it. Lower training.learning_rate, check the data, or set "
                f"training.nan_policy=skip to drop such steps (they are counted in train/skipped_steps)."
            )
        return False

    def _skip_step(self) -> dict[str, float]:
        """Drop this step's gradients; the schedule still advances so the LR follows the step count.
        Past `training.max_skipped_fraction` of `max_steps` the run stops: a run that skips most
        of its steps has not trained, whatever its step count says."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped_steps += 1
        t = self.training
        allowed = int(t.max_skipped_fraction * t.max_steps)
        if self.skipped_steps > allowed:
            raise FloatingPointError(
                f"{self.skipped_steps} of the {self.step + 1} steps so far were skipped for non-finite values, more than "
                f"training.max_skipped_fraction={t.max_skipped_fraction} of training.max_steps={t.max_steps} allows "
                f"({allowed}); the run stops rather than pass for trained. Check the data and training.learning_rate "
                "(training.nan_policy=stop names the first bad step and batch), or raise training.max_skipped_fraction."
            )
        return {"train/loss": float("nan"), "train/skipped_steps": self.skipped_steps}

    def _loader(self, dataset, batch_sampler) -> DataLoader:
        """A loader with its own generator: creating its iterator draws a worker base seed, which
        from the global RNG would shift every later draw of a resumed run by one."""
        workers = int(self.cfg.data.get("num_workers", 0))
        return DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=collate_samples, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(int(self.cfg.seed) + self.ctx.rank),
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """On held-out episodes (same batches every time), with the EMA weights, averaged over the
        ranks' shards: val/loss (the objective's), val/drift_norm (drifting's lambda_V, else the
        loss) and val/action_mse, the error of the chunks the policy would execute: drawn by
        `objective.sample` with the evaluation's nfe and sampler, as the rollouts draw them."""
        totals: dict[str, float] = defaultdict(float)
        batches = 0
        with self.ema.applied_to(self.model):
            for i, batch in self.validation_batches():
                obs, actions = self._to_device(batch)
                out = self.objective(self.model, obs, actions, self._training_inputs(self._generator(-1 - i), len(actions)))
                chunks = self._sample(obs, 1, self.validation_generator(i))[:, 0]
                # As executed: a flow or diffusion sample's 6D rotation becomes a valid rotation there.
                chunks = self.normalizer.normalize("actions", self.normalizer.unnormalize("actions", chunks))
                totals["val/loss"] += float(out.loss)
                totals["val/drift_norm"] += float(out.metrics.get("lambda_V", out.loss))
                totals["val/action_mse"] += float((chunks - actions).square().mean())
                batches += 1
            if self.sharded:  # FSDP keeps the root unsharded after forward: drop the EMA copy it holds
                self.model.reshard()
        return self._mean_over_ranks({key: value / batches for key, value in totals.items()})

    def _check_validation_readable(self) -> None:
        """Under data.skip_corrupt a damaged val sample is replaced by another val sample; a val
        split whose draws are all damaged would stop the run at its first validation, after
        training up to it. Its batches (training.val_batches, always the same) are read once now."""
        try:
            for _ in self.validation_batches():
                pass
        except CorruptEpisodeError as error:
            raise CorruptEpisodeError(
                f"the val split cannot be read, even with data.skip_corrupt=true: {error} Validation would stop the run at "
                f"step {int(self.cfg.training.val_every)}: train without it (training.val_every=0), or get the damaged "
                "files again"
            ) from error

    def validation_batches(self):
        """(index, batch) of this rank's validation batches: the same `training.val_batches` every time."""
        t = self.training
        size = min(t.batch_size, len(self.val_set) // self.ctx.world_size)
        if size < 1:
            raise ValueError(f"the val split has {len(self.val_set)} samples, fewer than the {self.ctx.world_size} ranks")
        sampler = ResumableBatchSampler(len(self.val_set), size, seed=int(self.cfg.seed), rank=self.ctx.rank, world_size=self.ctx.world_size)
        return zip(range(t.val_batches), self._loader(self.val_set, sampler), strict=False)

    def _log(self, metrics: dict[str, float]) -> None:
        self.history.record(self.step, metrics)
        self.logger.log_metrics(metrics, self.step)

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each rank's mean over its shard -> the mean over the global batch (collective)."""
        if self.ctx.world_size == 1:
            return metrics
        values = all_reduce_sum(torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device))
        return dict(zip(metrics, (values / self.ctx.world_size).tolist(), strict=True))

    def _sample(self, obs: dict, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Chunks [B, G, T, A] (normalized) as the policy draws them: the objective's sampler."""
        with self._autocast(), self._unsharded_root():
            condition = self.model.encode_condition(obs)
            return self.objective.sample(self.model, condition, num_samples, self.eval_nfe, self.eval_sampler, generator).float()

    def _autocast(self):
        """The training precision (bf16 autocast on CUDA by default), for training and sampling alike."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)

    @contextlib.contextmanager
    def _unsharded_root(self):
        """Under FSDP, sampling calls the model's methods, not its forward, so the root's own
        parameters are gathered here (collective: every rank samples); the blocks gather their own."""
        if not self.sharded:
            yield
            return
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def _render_panels(self, last: tuple) -> None:
        names = due_panels(self.step, self.training.wandb.visualizations)
        if not names:
            return
        obs, actions = last
        with torch.no_grad():
            samples = self._sample(obs, PANEL_SAMPLES, self._generator(-1_000_000 - self.step))
        if not self.ctx.is_main:
            return
        field = self.objective.field(samples, actions)
        inputs = PanelInputs.from_step(samples, actions, field, self.action_spec, self.history)
        for name in names:
            self.logger.log_panel(name, PANELS[name](inputs), self.step)

    def _gradient_sync(self, last_micro_batch: bool):
        """Gradients are reduced across ranks on the last micro-batch of an accumulation only."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last_micro_batch)
            return contextlib.nullcontext()
        if last_micro_batch or self.ctx.world_size == 1:
            return contextlib.nullcontext()
        return self.network.no_sync()

    def _save_checkpoint(self) -> None:
        """Rank 0 writes full state; under FSDP every rank takes part in gathering it."""
        if self.ctx.is_main or self.sharded:
            state = gather_training_state(self.model, self.ema, self.optimizer)
        ranks = self._per_rank_states()
        if self.ctx.is_main:
            config = OmegaConf.to_container(self.cfg, resolve=True)
            target = str(self.checkpoints_dir / checkpoint_dir_name(self.step))
            save_checkpoint(
                self.checkpoints_dir, step=self.step, state=state,
                **export_description(config, self.objective, target, self.eval_nfe, self.eval_sampler),
                scheduler=self.scheduler, config=config, normalization=self.normalizer.to_dict(),
                sampler_state=self.sampler.state_after(self.sampler_start, self.batches_consumed),
                extra={"skipped_steps": self.skipped_steps, "ranks": ranks},
            )
            prune_checkpoints(self.checkpoints_dir, self.training.keep_checkpoints)
        self._barrier()

    def _per_rank_states(self) -> list[dict]:
        """Every rank's RNG state and objective state (drifting's sample queue or neighbours), gathered for
        rank 0 to save (collective): a resumed rank continues its own streams."""
        mine = {"rng": capture_rng_state(), "objective": self.objective.state_dict()}
        if self.ctx.world_size == 1:
            return [mine]
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    @contextlib.contextmanager
    def _ema_model(self):
        """The EMA weights in a whole model for rank 0 to run alone: the training model itself,
        or under FSDP an unsharded copy (gathering is collective: every rank enters)."""
        if not self.sharded:
            with self.ema.applied_to(self.model):
                yield self.model
            return
        weights = {**get_model_state_dict(self.model, options=FULL_STATE), **self.ema.state_dict()}
        if not self.ctx.is_main:
            yield None
            return
        copy = build_model(OmegaConf.merge(self.cfg, {"model": {"pretrained": False}}))
        copy.load_state_dict(weights)
        yield copy.to(self.device)

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            path = find_latest_valid_checkpoint(self.checkpoints_dir)
            if path is None:
                if self.ctx.is_main:
                    print(f"training.resume=auto: no valid checkpoint in {self.checkpoints_dir}; starting from step 0")
                return
        else:
            path = resolve_checkpoint(resume)
        state = load_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler)
        if state.normalization.get("stats") != self.normalizer.to_dict()["stats"]:
            raise ValueError(
                f"the normalization statistics saved in {path} differ from this run's data ({self.cfg.data.name}); "
                f"resuming would train on differently scaled actions. Resume with the same data config."
            )
        conflicts = resume_conflicts(state.config, self.cfg)
        if conflicts:
            raise ValueError(
                f"cannot resume from {path}: this run's config differs from the checkpoint's in settings that shape what "
                f"is trained ({'; '.join(conflicts)}). Resume with the checkpoint's values (its config.json), or train "
                "into another directory to start a fresh run."
            )
        self.step = state.step
        self.history = MetricHistory.from_jsonl(self.run_dir / "metrics.jsonl", up_to_step=self.step)
        self.sampler.load_state_dict(state.sampler_state)
        self.skipped_steps = int(state.extra.get("skipped_steps", 0))
        ranks = state.extra["ranks"]
        if len(ranks) != self.ctx.world_size:
            raise ValueError(
                f"{path} was written by {len(ranks)} rank(s) and this run has {self.ctx.world_size}: each rank "
                "resumes its own random streams and sample queue, so resume with the same number of ranks"
            )
        restore_rng_state(ranks[self.ctx.rank]["rng"])
        self.objective.load_state_dict(ranks[self.ctx.rank]["objective"])
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _evaluate_in_sim(self, final: bool) -> dict | None:
        """Closed-loop success rate of the EMA policy (rank 0; other ranks wait)."""
        if simulation_config(self.cfg.data) is None:
            if self.ctx.is_main:
                print(f"no closed-loop evaluation: {NO_SIMULATOR}", flush=True)
            return None
        # The checkpoint holds the RNG state before evaluation; evaluating must not shift it.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), self._ema_model() as model:
            summary = self._run_simulation(model, final) if self.ctx.is_main else None
        self._barrier()
        return summary

    def _run_simulation(self, model, final: bool) -> dict:
        e = self.training.eval
        out_dir = self.run_dir / ("eval" if final else f"eval/step_{self.step:08d}")
        policy = DriftingPolicy(model, self.normalizer, self.objective, execution=e.execution,
                                execute_steps=e.execute_steps, ensemble_decay=e.ensemble_decay,
                                nfe=self.eval_nfe, sampler=self.eval_sampler, precision=self.training.precision)
        result = self.evaluator(policy, out_dir)
        summary = result.to_dict()
        self._log({"sim/success_rate": summary["success_rate"],
                   **{f"sim/success_rate/{task}": rate for task, rate in summary["per_task"].items()}})
        for video in result.videos[:1]:
            self.logger.log_video("sim/rollout_video", np.stack(imageio.mimread(video, memtest=False)), self.step)
        self.logger.log_video_files(TRAJECTORY_VIDEO_KEY, result.trajectory_videos, self.step)
        if final:  # "step": which checkpoint was evaluated (an export's model card reads it)
            write_atomic(self.run_dir / "summary.json", json.dumps({**summary, "step": self.step}, indent=2))
            print(result.format_table(), flush=True)
            print(f"summary: {self.run_dir / 'summary.json'}", flush=True)
        return summary

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()


RUN_LOCK_FILE = ".lock"
RUN_DIR_TAKEN = ("Two runs writing one directory mix their checkpoints and metrics: wait for that run to end or stop it, "
                 "or train into another directory (hydra.run.dir=... with scripts/train.py, run_dir=... otherwise).")

PANEL_SAMPLES = 8
"""Chunks drawn per observation for the panels (distributions, mode coverage), whatever the objective."""


class _Throughput:
    """Samples/s and the share of step time spent waiting for the loader, smoothed."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay, self.samples_per_second, self.data_wait_share = decay, 0.0, 0.0
        self._start, self._wait = 0.0, 0.0

    def start(self) -> None:
        self._start, self._wait = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def waiting_for_data(self):
        t0 = time.perf_counter()
        yield
        self._wait += time.perf_counter() - t0

    def stop(self, samples: int) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate, share = samples / elapsed, self._wait / elapsed
        first = self.samples_per_second == 0.0
        self.samples_per_second = rate if first else self.decay * self.samples_per_second + (1 - self.decay) * rate
        self.data_wait_share = share if first else self.decay * self.data_wait_share + (1 - self.decay) * share


@contextlib.contextmanager
def _unlocked(cfg: DictConfig):
    OmegaConf.set_struct(cfg, False)
    try:
        yield
    finally:
        OmegaConf.set_struct(cfg, True)

