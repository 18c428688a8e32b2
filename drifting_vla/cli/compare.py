"""Side by side: objectives x training seeds on one data config, every run with the same data,
steps, batch, learning rate, EMA and evaluation seeds; each checkpoint evaluated in closed loop at
every requested NFE, and each policy's chunk timed at batch 1 on this machine in this run.

    python scripts/compare.py --output comparisons/quickstart                   # the default matrix
    python scripts/compare.py --output comparisons/quick --runs drifting:0 flow_matching:0 \\
        --protocols drifting:1 flow_matching:1,10 --episodes 10 -- training.max_steps=500
    python scripts/compare.py --output comparisons/ablation --runs drifting:0 drifting@dim:0 \\
        --variant dim "training.drifting.grouping=dimension" --protocols drifting:1    # a recipe ablation
    python scripts/compare.py --output comparisons/gpu --parallel 6 --train-only    # train on a GPU, side by side;
    python scripts/compare.py --output comparisons/gpu                               # then evaluate where the simulator is

    --runs        objective[@variant]:seed[,seed...]    (default: drifting:0,1 regression:0,1 flow_matching:0 diffusion:0)
    --variant     NAME "OVERRIDES"    the Hydra overrides a variant adds to its runs (a recipe ablation:
                                      every variant shares the data, budget and evaluation seeds)
    --protocols   objective[/sampler]:nfe,... (default: drifting:1 regression:1 flow_matching:1,2,5,10
                                               diffusion/ddim:1,2,5,10 diffusion/ddpm:100)
    --execute-steps K ...                     actions executed per chunk before replanning: every protocol is
                                              evaluated at each K (default: a quarter of the horizon, 4 of 16)
    --plugins     module ...                  modules of yours registering a dataset or simulator
                                              (drifting_vla/plugins.py), imported here and by every run
    --parallel N                              training runs at once (default 1); a GPU trains several small
                                              models side by side faster than one after another
    --train-only                              train the matrix and stop: evaluate later, or on a machine with
                                              the simulator (copy runs/ there; a run directory may hold a
                                              checkpoint or a save_pretrained export of its final policy)
    --retrain                                 a finished run trained with other overrides than asked now is
                                              trained again (its evaluations deleted); without it, refused
    after --       Hydra overrides given to EVERY training run (the shared budget)

Layout under --output (a killed comparison resumes: finished runs and evaluations are kept,
an interrupted training run continues from its newest checkpoint). A finished run is reused only
when it was trained with the overrides asked now (trained.json records them); else compare.py
names the keys that differ and stops, or with --retrain trains it again:

    runs/<objective>[@variant]_seed<s>/          scripts/train.py run directories (logs in train.log)
    evals/<objective>[@variant]_seed<s>/<protocol>/summary.json, episodes.jsonl, videos/
    comparison.json, comparison.md, success_vs_nfe.png, success_vs_latency.png, success_by_row.png
    (and success_vs_execute_steps.png with more than one --execute-steps, stages_reached.png where the
    env reports how far a staged reward got: ALOHA)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch
from tqdm import tqdm

from drifting_vla.benchmarks.timing import time_call
from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.evaluation.results import wilson_interval
from drifting_vla.evaluation.rollout import evaluate, protocol_label
from drifting_vla.formats.export import read_saved_policy
from drifting_vla.formats.files import write_atomic
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.plugins import load_plugins
from drifting_vla.specs import default_execute_steps

PLOT_COLORS = {"drifting": "tab:red", "regression": "tab:gray", "flow_matching": "tab:blue", "diffusion": "tab:green"}
DEFAULT_RUNS = ["drifting:0,1", "regression:0,1", "flow_matching:0", "diffusion:0"]
DEFAULT_PROTOCOLS = ["drifting:1", "regression:1", "flow_matching:1,2,5,10", "diffusion/ddim:1,2,5,10", "diffusion/ddpm:100"]


@dataclass(frozen=True)
class Run:
    objective: str
    seed: int
    variant: str | None = None

    @property
    def method(self) -> str:
        """The objective, and the recipe variant when there is one: `drifting@dim`."""
        return self.objective if self.variant is None else f"{self.objective}@{self.variant}"

    @property
    def name(self) -> str:
        return f"{self.method}_seed{self.seed}"

    def cell(self, protocol: Protocol) -> str:
        """The row a run's evaluation under `protocol` pools into (its seeds pool together)."""
        return protocol.name.replace(self.objective, self.method, 1)


@dataclass(frozen=True)
class Protocol:
    objective: str
    sampler: str | None
    nfe: int
    execute_steps: int | None = None  # None: the policy's default, a quarter of the horizon

    @property
    def name(self) -> str:
        execution = "" if self.execute_steps is None else f"_exec{self.execute_steps}"
        return f"{self.objective}{'' if self.sampler is None else '-' + self.sampler}_nfe{self.nfe}{execution}"


def _name_and_numbers(spec: str, flag: str, form: str) -> tuple[str, list[int]]:
    """'name:1,2' -> ('name', [1, 2]); a malformed spec exits naming the flag and the form."""
    name, _, numbers = spec.partition(":")
    try:
        return name, [int(n) for n in numbers.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} {spec!r}: expected {form}") from None


def parse_runs(specs: list[str], variants: dict[str, list[str]]) -> list[Run]:
    parsed = [_name_and_numbers(s, "--runs", "objective[@variant]:seed[,seed...], e.g. drifting:0,1") for s in specs]
    runs = []
    for method, seeds in parsed:
        objective, _, variant = method.partition("@")
        if variant and variant not in variants:
            raise SystemExit(f"--runs {method}: no --variant {variant!r} defines its overrides (defined: {sorted(variants)})")
        runs += [Run(objective, seed, variant or None) for seed in seeds]
    return runs


def parse_protocols(specs: list[str], execute_steps: list[int | None]) -> list[Protocol]:
    form = "objective[/sampler]:nfe[,nfe...], e.g. flow_matching:1,10"
    parsed = [_name_and_numbers(s, "--protocols", form) for s in specs]
    return [
        Protocol(method.partition("/")[0], method.partition("/")[2] or None, nfe, steps)
        for method, nfes in parsed
        for nfe in nfes
        for steps in execute_steps
    ]


# ----------------------------------------------------------------------------------------------
# The matrix


def train(run: Run, output: Path, overrides: list[str], retrain: bool = False) -> Path:
    """Train (or finish training) one run; returns its run directory. Resumable: the trainer
    continues from the newest checkpoint, and a finished run trained with these overrides is not
    touched; one trained with others is refused naming them, or with `retrain` trained again."""
    run_dir = output / "runs" / run.name
    command = [
        sys.executable, "-m", "drifting_vla.cli.train", f"hydra.run.dir={run_dir}", f"seed={run.seed}",
        f"training.objective={run.objective}", "training.eval.at_end=false", "training.resume=auto", *overrides,
    ]
    if (run_dir / "trained.json").exists():
        differ = differing_overrides(json.loads((run_dir / "trained.json").read_text())["command"], command)
        if not differ:
            return run_dir
        if not retrain:
            raise SystemExit(
                f"{run_dir} was trained with other settings than asked now: {'; '.join(differ)}. Its results would be "
                "reported under the new ones: pass --retrain to train it again (its evaluations are deleted), or give "
                "another --output"
            )
        shutil.rmtree(run_dir)
        shutil.rmtree(output / "evals" / run.name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(run_dir / "train.log", "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"training {run.name} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    record = {"command": command, "seconds": time.time() - started, "machine": machine_description()}
    write_atomic(run_dir / "trained.json", json.dumps(record))
    return run_dir


def differing_overrides(trained: list[str], asked: list[str]) -> list[str]:
    """'key: trained -> asked' for each Hydra override (key=value) in which two train.py commands
    differ; hydra.* keys (where the run directory was) are left out, a run may have been moved."""
    def settings(command: list[str]) -> dict[str, str]:
        pairs = (arg.split("=", 1) for arg in command[2:] if "=" in arg)
        return {key: value for key, value in pairs if not key.startswith("hydra.")}

    before, now = settings(trained), settings(asked)
    return [f"{key}: {before.get(key, '(not set)')} -> {now.get(key, '(not set)')}"
            for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]


def machine_description() -> str:
    """Where a run trains (scripts/train.py's `device: auto` takes the GPU when there is one)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores"


def train_all(runs: list[Run], output: Path, overrides: list[str], variants: dict[str, list[str]], parallel: int,
              retrain: bool = False) -> dict[Run, Path]:
    """Every run trained, `parallel` training processes at a time; the first failure stops the matrix
    after the runs in flight finish (their checkpoints resume on the next call)."""
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {run: pool.submit(train, run, output, [*overrides, *variants.get(run.variant, [])], retrain) for run in runs}
        bar = tqdm(as_completed(futures.values()), total=len(runs), desc=f"training ({parallel} at a time)", unit="run", dynamic_ncols=True)
        for future in bar:
            if future.exception() is not None:
                for queued in futures.values():
                    queued.cancel()
                raise future.exception()
    return {run: future.result() for run, future in futures.items()}


def evaluate_run(run: Run, run_dir: Path, protocol: Protocol, output: Path, episodes: int, workers: int) -> dict:
    """Closed-loop success of one checkpoint under one sampling protocol (cached in summary.json;
    a cached cell is reused only if it executed as many actions per chunk as asked now)."""
    out_dir = output / "evals" / run.name / protocol.name
    summary_file = out_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        executed, horizon = execution_of(summary["protocol"])
        asked = protocol.execute_steps or default_execute_steps(horizon)
        if executed != asked:
            raise SystemExit(
                f"{out_dir} was evaluated executing {executed} of {horizon} actions per chunk, and this comparison asks "
                f"for {asked} (the default changed since, or --execute-steps did): rename it to {protocol.name}_exec{executed} "
                f"and pass --execute-steps {executed} to keep it, or delete it to evaluate again"
            )
        return summary
    policy = DriftingPolicy.from_checkpoint(run_dir, nfe=protocol.nfe, sampler=protocol.sampler, execute_steps=protocol.execute_steps)
    data_cfg = policy.cfg["data"]
    evaluate(
        policy, data_cfg, seeds=evaluation_seeds(data_cfg, episodes), num_workers=workers, output_dir=out_dir,
        videos_per_task=1, protocol=protocol_label(data_cfg, policy.method, policy.execution_label), progress=False,
        record={"checkpoint": str(policy.checkpoint)},
    )
    return json.loads(summary_file.read_text())


def chunk_latency(run_dir: Path, protocol: Protocol, repeats: int = 20) -> dict:
    """Median ms for one chunk at batch 1 on one thread (end to end, and the encoders alone)."""
    policy = DriftingPolicy.from_checkpoint(run_dir, nfe=protocol.nfe, sampler=protocol.sampler)
    data = policy.cfg["data"]
    size, views = int(data["image_size"]), len(data["cameras"])
    steps = (policy.n_obs_steps,) if policy.n_obs_steps > 1 else ()  # an observation history: all n steps
    obs = {
        "images": torch.randint(0, 256, (1, *steps, views, 3, size, size), dtype=torch.uint8),
        "proprio": torch.zeros(1, *steps, int(data["proprio_dim"])),
        "instruction": [(data.get("instructions") or ["open the drawer"])[0]],  # task embeddings know only theirs
    }
    normalized = {**obs, "proprio": policy.normalizer.normalize("proprio", obs["proprio"])}
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = time_call(lambda: policy.predict_action_chunk(obs, generator), repeats=repeats)
        with torch.inference_mode():
            encoders = time_call(lambda: policy.model.encode_condition(normalized), repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    return {"ms": 1000 * total, "encoder_ms": 1000 * encoders}


# ----------------------------------------------------------------------------------------------
# Results


def aggregate(results: list[dict], latencies: dict[str, dict], runs: list[Run]) -> list[dict]:
    """One row per protocol: success pooled over every seed's episodes (95% Wilson CI), the
    spread over training seeds, and the chunk latency with its ratio to drifting's."""
    drifting_ms = next((lat["ms"] for name, lat in latencies.items() if name.startswith("drifting_")), None)
    rows = []
    for name in dict.fromkeys(r["protocol_name"] for r in results):
        mine = [r for r in results if r["protocol_name"] == name]
        successes = sum(round(r["success_rate"] * r["episodes"]) for r in mine)
        episodes = sum(r["episodes"] for r in mine)
        per_seed = [r["success_rate"] for r in mine]
        latency = latencies.get(name, {})
        rows.append({
            "protocol": name,
            "objective": mine[0]["objective"],
            "variant": mine[0]["variant"],
            "sampler": mine[0]["sampler"],
            "nfe": mine[0]["nfe"],
            "execute_steps": mine[0]["execute_steps"],
            "label": mine[0]["protocol"],
            "success": successes / episodes if episodes else float("nan"),
            "ci95": list(wilson_interval(successes, episodes)),
            "episodes": episodes,
            "seeds": [r["seed"] for r in mine],
            "success_per_seed": per_seed,
            "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
            "per_task": {task: float(np.mean([r["per_task"][task] for r in mine])) for task in mine[0]["per_task"]},
            "errors": sum(r["errors"] for r in mine),
            "modes": pooled_modes(mine),
            "stages": pooled_stages(mine),
            "latency_ms": latency.get("ms"),
            "encoder_ms": latency.get("encoder_ms"),
            "slowdown_vs_drifting": latency["ms"] / drifting_ms if latency and drifting_ms else None,
        })
    return rows


def pooled_modes(summaries: list[dict]) -> dict | None:
    """Each mode's share of the episodes and success rate, pooled over seeds (None when the env
    labels no modes)."""
    if not all(s.get("modes") for s in summaries):
        return None
    episodes: dict[str, int] = {}
    wins: dict[str, int] = {}
    for summary in summaries:
        for m, row in summary["modes"].items():
            episodes[m] = episodes.get(m, 0) + row["episodes"]
            wins[m] = wins.get(m, 0) + round(row["success"] * row["episodes"])
    total = sum(episodes.values())
    return {m: {"share": episodes[m] / total, "episodes": episodes[m], "success": wins[m] / episodes[m]} for m in sorted(episodes)}


def pooled_stages(summaries: list[dict]) -> dict | None:
    """Per task, the share of episodes reaching at least each stage of the staged reward, pooled
    over seeds (None when the env labels no stages)."""
    if not all(s.get("stages") for s in summaries):
        return None
    pooled = {}
    for task, names in summaries[0]["stages"].items():
        if not all(task in s["stages"] for s in summaries):
            continue  # a seed whose every episode of the task failed before a step labels no stages for it
        episodes = [s["per_task_episodes"][task] for s in summaries]
        pooled[task] = {
            name: sum(s["stages"][task][name] * n for s, n in zip(summaries, episodes, strict=True)) / sum(episodes)
            for name in names
        }
    return pooled


def executed_per_chunk(label: str) -> str:
    """'8/16': actions executed per chunk and the horizon, as an evaluation's protocol label
    ('metaworld | drifting nfe=1 | chunk 8/16') records them."""
    return label.split(" | ")[-1].removeprefix("chunk ")


def execution_of(label: str) -> tuple[int, int]:
    """(actions executed per chunk, horizon) of an evaluation's protocol label."""
    executed, horizon = executed_per_chunk(label).split("/")
    return int(executed), int(horizon)


def executed_steps(row: dict) -> int:
    return execution_of(row["label"])[0]


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [
        f"# Comparison: {meta['data']}",
        "",
        f"Same data, {meta['max_steps']} steps, batch {meta['batch_size']}, learning rate {meta['learning_rate']}, "
        f"EMA {meta['ema_decay']} for every run; {meta['episodes_per_task']} evaluation episodes per task on seeds "
        f"never used in training, chunk execution ({meta['execution']}: executed/horizon). Latency: one chunk at batch 1, one CPU "
        f"thread, median, measured in this run on {meta['machine']}.",
        "",
        "| objective | sampler | NFE | execution | success | 95% CI | seeds | spread over seeds (std) | latency ms "
        "| of which encoders | x drifting |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = "-" if r["seed_std"] is None else f"{r['seed_std']:.3f} ({', '.join(f'{s:.3f}' for s in r['success_per_seed'])})"
        latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
        encoders = "-" if r["encoder_ms"] is None else f"{r['encoder_ms']:.2f}"
        ratio = "-" if r["slowdown_vs_drifting"] is None else f"{r['slowdown_vs_drifting']:.1f}x"
        lo, hi = r["ci95"]
        method = r["objective"] if r["variant"] is None else f"{r['objective']} @{r['variant']}"
        lines.append(
            f"| {method} | {r['sampler'] or '-'} | {r['nfe']} | {executed_per_chunk(r['label'])} | **{r['success']:.3f}** | [{lo:.2f}, {hi:.2f}] | "
            f"{len(r['seeds'])} | {spread} | {latency} | {encoders} | {ratio} |"
        )
    tasks = list(rows[0]["per_task"]) if rows else []
    lines += ["", "Per task (mean over seeds):", "", "| protocol | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {r['protocol']} | " + " | ".join(f"{r['per_task'][t]:.2f}" for t in tasks) + " |" for r in rows]
    modes = sorted({m for r in rows for m in (r["modes"] or {})})
    if modes:
        lines += ["", "Which way each episode went (share of episodes, success rate of those), pooled over seeds:", "",
                  "| protocol | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        lines += [
            f"| {r['protocol']} | "
            + " | ".join(f"{r['modes'][m]['share']:.0%} ({r['modes'][m]['success']:.2f})" if m in r["modes"] else "-" for m in modes)
            + " |"
            for r in rows if r["modes"]
        ]
    for task in dict.fromkeys(t for r in rows for t in (r["stages"] or {})):
        names = next(r["stages"][task] for r in rows if r["stages"] and task in r["stages"])
        lines += ["", f"How far the episodes got on {task} (share reaching at least each stage of the task's reward), "
                  "pooled over seeds:", "", "| protocol | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {r['protocol']} | " + " | ".join(f"{r['stages'][task][n]:.0%}" for n in names) + " |"
                  for r in rows if r["stages"] and task in r["stages"]]
    if meta.get("variants"):
        lines += ["", "Variants (overrides added to the shared ones): "
                  + "; ".join(f"`{name}`: {' '.join(o)}" for name, o in meta["variants"].items())]
    lines += ["", f"Wall time of the matrix: {meta['wall_minutes']:.1f} min (training {meta['train_minutes']:.1f} on "
              f"{meta['trained_on']}, evaluation {meta['eval_minutes']:.1f}), as recorded by each cell when it "
              "ran (runs trained side by side each count their own wall time).", ""]
    path.write_text("\n".join(lines))


def plot(rows: list[dict], output: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {None: "o", "ddim": "o", "ddpm": "s"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for key in dict.fromkeys((r["objective"], r["sampler"], r["variant"], r["execute_steps"]) for r in rows):
        mine = sorted((r for r in rows if (r["objective"], r["sampler"], r["variant"], r["execute_steps"]) == key), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in mine]
        success = np.array([r["success"] for r in mine])
        err = _intervals(mine)
        label = key[0] + ("" if key[2] is None else f" @{key[2]}") + ("" if key[1] is None else f" ({key[1]})") + (
            "" if key[3] is None else f" exec {key[3]}")
        ax.errorbar(nfe, success, yerr=err, marker=markers.get(key[1], "o"), color=PLOT_COLORS.get(key[0]), capsize=3, label=label,
                    linestyle="-" if key[2] is None else "--")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("network evaluations per chunk (NFE, log scale)")
    _save_success_plot(fig, ax, output / "success_vs_nfe.png", "Success vs NFE, same network and budget", "lower right")

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    timed = sorted((r for r in rows if r["latency_ms"] is not None), key=lambda r: -r["success"])
    for i, r in enumerate(timed):
        ax.errorbar(r["latency_ms"], r["success"], yerr=_intervals([r]), marker=markers.get(r["sampler"], "o"),
                    color=PLOT_COLORS.get(r["objective"]), capsize=3)
        # Points at one latency crowd together: labels step down the right-hand side instead.
        ax.annotate(f"{r['protocol']} ({r['success']:.2f})",
                    (r["latency_ms"], r["success"]), textcoords="offset points", xytext=(10, 12 - 12 * (i % 4)),
                    fontsize=7, color=PLOT_COLORS.get(r["objective"]))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fastest, slowest = min(r["latency_ms"] for r in timed), max(r["latency_ms"] for r in timed)
    ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if 0.5 * fastest <= t <= 2 * slowest])
    ax.set_xlabel("chunk latency at batch 1, ms (log scale, 1 CPU thread)")
    _save_success_plot(fig, ax, output / "success_vs_latency.png", "Success vs latency")


def _intervals(rows: list[dict]) -> np.ndarray:
    """[2, n] distances from each row's success down and up to its 95% interval (errorbar's form)."""
    return np.array([[r["success"] - r["ci95"][0], r["ci95"][1] - r["success"]] for r in rows]).T


def _save_success_plot(fig, ax, path: Path, title: str, legend_loc: str | None = None) -> None:
    """The axes every success-vs-something plot shares (rate on y with its 95% intervals), then the file."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("closed-loop success rate (95% CI)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if legend_loc is not None:
        ax.legend(loc=legend_loc, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_rows(rows: list[dict], output: Path) -> None:
    """Every row's success with its 95% interval on one axis, in table order: the readable view of a
    recipe ablation, where many variants sit at the same NFE and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 1.2 + 0.38 * len(rows)), dpi=120)
    for i, r in enumerate(rows):
        color = PLOT_COLORS.get(r["objective"])
        ax.errorbar(r["success"], i, xerr=_intervals([r]), marker="o", color=color, capsize=3)
        ax.annotate(f"{r['success']:.3f}", (r["success"], i), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
    ax.set_yticks(range(len(rows)), [f"{r['protocol']} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})" for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.8)  # top row first, room for its label under the title
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("closed-loop success rate (95% Wilson interval over episodes)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Success per method and variant, same data, budget and evaluation seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(output / "success_by_row.png")
    plt.close(fig)


def plot_stages(rows: list[dict], output: Path) -> None:
    """Per task, the share of episodes reaching at least each stage of the staged reward, one line
    per row: where each method's episodes stop when few succeed (ALOHA: touched, lifted, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for r in rows for t in (r["stages"] or {})))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.4), dpi=120, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, task in zip(axes[0], tasks, strict=True):
        staged = [r for r in rows if r["stages"] and task in r["stages"]]
        names = list(staged[0]["stages"][task])
        for i, r in enumerate(staged):
            ax.plot(range(len(names)), [r["stages"][task][n] for n in names], marker="o", label=r["protocol"],
                    color=PLOT_COLORS.get(r["objective"]), linestyle=styles[i % len(styles)])
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel(f"stage of the task's reward ({task})")
        ax.set_ylabel("share of episodes reaching at least this stage")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"How far the episodes got: {task}")
    fig.tight_layout()
    fig.savefig(output / "stages_reached.png")
    plt.close(fig)


def plot_execution(rows: list[dict], output: Path) -> None:
    """Success against actions executed per chunk, one line per method and NFE: drawn when the
    comparison evaluated more than one --execute-steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for key in dict.fromkeys((r["objective"], r["variant"], r["sampler"], r["nfe"]) for r in rows):
        mine = sorted((r for r in rows if (r["objective"], r["variant"], r["sampler"], r["nfe"]) == key), key=executed_steps)
        method = key[0] + ("" if key[1] is None else f" @{key[1]}") + ("" if key[2] is None else f" ({key[2]})")
        ax.errorbar([executed_steps(r) for r in mine], [r["success"] for r in mine], yerr=_intervals(mine), marker="o",
                    capsize=3, label=f"{method}, NFE {key[3]}", color=PLOT_COLORS.get(key[0]), linestyle="-" if key[1] is None else "--")
    ax.set_xticks(sorted({executed_steps(r) for r in rows}))
    ax.set_xlabel(f"actions executed per chunk before replanning (horizon {execution_of(rows[0]['label'])[1]})")
    _save_success_plot(fig, ax, output / "success_vs_execute_steps.png", "Success vs execution horizon, same checkpoints", "lower left")


def resolved_budget(run_dir: Path) -> dict:
    """The shared budget, read from a run directory or from the export of its final policy."""
    cfg = read_saved_policy(run_dir).cfg
    t = cfg["training"]
    return {"data": cfg["data"]["name"] + " " + ", ".join(cfg["data"].get("tasks", [])), "max_steps": t["max_steps"],
            "batch_size": t["batch_size"], "learning_rate": t["learning_rate"], "ema_decay": t["ema_decay"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                        help='a recipe variant for --runs objective@NAME:seeds, e.g. --variant dim "training.drifting.grouping=dimension"')
    parser.add_argument("--protocols", nargs="+", default=DEFAULT_PROTOCOLS)
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task (data.eval_seeds)")
    parser.add_argument("--workers", type=int, default=2, help="simulator processes per evaluation")
    parser.add_argument("--execute-steps", type=int, nargs="+", default=[None],
                        help="actions executed per chunk before replanning; every protocol at each (default: a quarter of the horizon)")
    parser.add_argument("--plugins", nargs="+", default=[], help="modules of yours to import (drifting_vla/plugins.py)")
    parser.add_argument("--parallel", type=int, default=1, help="training runs at once (default 1)")
    parser.add_argument("--train-only", action="store_true", help="train the matrix and stop (evaluate later, or elsewhere)")
    parser.add_argument("--retrain", action="store_true",
                        help="train again the finished runs whose recorded overrides differ from those asked now")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training run (after --)")
    args = parser.parse_args()
    load_plugins(args.plugins)
    if args.plugins:
        args.overrides = [f"plugins=[{','.join(args.plugins)}]", *args.overrides]
    variants = {name: overrides.split() for name, overrides in args.variant}
    runs, protocols = parse_runs(args.runs, variants), parse_protocols(args.protocols, args.execute_steps)
    for run in runs:
        if not any(p.objective == run.objective for p in protocols):
            raise SystemExit(f"--runs has {run.objective} but --protocols gives it no NFE to evaluate at")
    args.output.mkdir(parents=True, exist_ok=True)
    # The policy runs in this process during evaluations: one thread, so that a busy machine
    # (the simulator workers, other jobs) cannot stall it at OpenMP barriers.
    torch.set_num_threads(1)

    if args.parallel < 1:
        raise SystemExit(f"--parallel {args.parallel}: expected at least 1 training run at a time")
    run_dirs = (train_all(runs, args.output, args.overrides, variants, args.parallel, args.retrain)
                if args.parallel > 1 or args.train_only else {})
    if args.train_only:
        print(f"trained {len(runs)} runs under {args.output / 'runs'}; evaluate them with the same command without --train-only")
        return
    cells = [(run, None) for run in runs if run not in run_dirs] + [(run, p) for run in runs for p in protocols if p.objective == run.objective]
    # Run order: each run is evaluated as soon as it is trained, so results arrive early.
    cells.sort(key=lambda cell: (runs.index(cell[0]), cell[1] is not None))
    results = []
    bar = tqdm(cells, desc="comparison", unit="cell", dynamic_ncols=True)
    for run, protocol in bar:
        bar.set_postfix_str(run.name if protocol is None else f"{run.name} @ {protocol.name}")
        if protocol is None:
            run_dirs[run] = train(run, args.output, [*args.overrides, *variants.get(run.variant, [])], args.retrain)
            continue
        summary = evaluate_run(run, run_dirs[run], protocol, args.output, args.episodes, args.workers)
        results.append({**summary, "protocol_name": run.cell(protocol), "objective": protocol.objective,
                        "variant": run.variant, "sampler": protocol.sampler, "nfe": protocol.nfe,
                        "execute_steps": protocol.execute_steps, "seed": run.seed})
        bar.write(f"{run.name} @ {protocol.name}: success {summary['success_rate']:.3f} over {summary['episodes']} episodes")

    # One timing per policy (run, sampler, NFE): the execution horizon does not change what a chunk costs.
    timed = {run.cell(p): (run, replace(p, execute_steps=None)) for run in reversed(runs) for p in protocols if p.objective == run.objective}
    measured = {policy: chunk_latency(run_dirs[policy[0]], policy[1])
                for policy in tqdm(dict.fromkeys(timed.values()), desc="latency", unit="policy")}
    latencies = {cell: measured[policy] for cell, policy in timed.items()}
    rows = aggregate(results, latencies, runs)
    trained = [json.loads((d / "trained.json").read_text()) for d in run_dirs.values()]
    train_seconds = sum(t["seconds"] for t in trained)
    eval_seconds = sum(r["seconds"] for r in results)
    meta = {
        **resolved_budget(next(iter(run_dirs.values()))),
        "episodes_per_task": args.episodes,
        "execution": ", ".join(dict.fromkeys(executed_per_chunk(r["label"]) for r in rows)),
        "machine": f"{os.cpu_count()} CPU cores",
        "trained_on": ", ".join(dict.fromkeys(t.get("machine", "an unrecorded machine") for t in trained)),
        "train_minutes": train_seconds / 60,
        "eval_minutes": eval_seconds / 60,
        "wall_minutes": (train_seconds + eval_seconds) / 60,
        "overrides": args.overrides,
        "variants": variants,
    }
    (args.output / "comparison.json").write_text(json.dumps({"meta": meta, "rows": rows, "cells": results}, indent=2))
    write_markdown(rows, meta, args.output / "comparison.md")
    plot(rows, args.output)
    plot_rows(rows, args.output)
    if any(r["stages"] for r in rows):
        plot_stages(rows, args.output)
    if len(args.execute_steps) > 1:
        plot_execution(rows, args.output)
    print((args.output / "comparison.md").read_text())


if __name__ == "__main__":
    main()
