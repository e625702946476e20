"""Training stages `teacher`, `distill` and `feature_net`: one kind family, one module. Each builds
its method from the recipe stage and runs the one loop (`fastgen_core.loop.train`) in-process
(`compute.backend: local`) or on Ray Train workers (`compute.backend: ray`), then saves the model
(model.safetensors + model.json, resume.safetensors for a method's `resume` networks, and EMA
snapshots under snapshots/). The three kinds differ only in
what they say about the model (a teacher, a distilled student, a feature network for metrics).

Both paths call the same `fit(config)`; under Ray it is `TorchTrainer`'s per-worker function
(torch.distributed is initialised by Ray Train: gloo on CPU, NCCL on GPU) and rank 0 hands the
trained model back as a Ray Train checkpoint, which the driver copies into the stage output. The
recipe travels to the workers as the validated `Recipe` object.

CLI: python -m stages.run RECIPE.yaml STAGE
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fastgen_core import loop
from fastgen_core.config import NetworkConfig, TrainConfig
from fastgen_core.data import cached_data
from fastgen_core.methods import get_method
from fastgen_core.methods.base import Context
from fastgen_core.models import load_model, load_resume, save_model, save_resume, snapshot_dir
from fastgen_core.noise import NoiseProcess

from . import storage
from .spec import MethodConfig, Problem, StageError, StageSpec, network_problems, one_input, stage_names
from .timing import add_phase, current, pause_point, phase, recording


class Spec(StageSpec):
    """A stage that trains a model with a method."""

    kind: Literal["teacher", "distill", "feature_net"] = Field(
        ..., description="teacher: a diffusion teacher; distill: a student; feature_net: the metrics' feature network")
    method: MethodConfig = Field(..., description="the method: `name` picks fastgen_core/methods/<name>.py, "
                                 "the rest is its Config (docs/recipes.md lists every method's settings)")
    network: NetworkConfig | None = Field(None, description="network of the trained model (None: copy the teacher's)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training-loop settings")
    noise: NoiseProcess | None = Field(None, description="this stage's noise process (None: the recipe's `noise`)")
    classes: list[int] | None = Field(None, min_length=1, description=(
        "train on these classes only (class-conditional data): the data's train and test splits are filtered "
        "to them; input pair sets are not (e.g. one student of a `students` group, docs/methods.md §8)"))

    omit_at_default = {"classes": None}  # the params digest of every stage without it is as it was (Strict)

    def problems(self, recipe, name: str) -> list[Problem]:
        probs = method_problems(self, recipe, name) + settings_problems(self, recipe, name)
        needs_network = getattr(get_method(self.method.name).Method, "needs_network", True)
        if self.network is None and self.method.name != "classifier" and needs_network and "teacher" not in self.inputs:
            probs.append((f"stages.{name}.network", "no `teacher` input to copy the network from: "
                          "give this stage's network"))
        return probs + class_problems(self, recipe, name) + warm_start_problems(self, recipe, name)

    def model_method(self, recipe, seen: tuple = ()) -> str | None:
        return self.method.name


# A training stage's own input role, whatever its method: a model whose `net` weights the trained
# network `net` starts from (loaded once the method is built; e.g. a small MSD student after its
# TSM stage, docs/methods.md §8), and whose `resume` networks saved beside it (live weights, e.g.
# DMD2's fake critic, docs/methods.md §5) start this method's networks of the same names. Other
# networks the method copied from `net` while being built keep the weights they were copied from.
WARM_START = "warm_start"


def class_problems(spec, recipe, name: str) -> list[Problem]:
    """`classes` on unlabelled data, or naming a class twice or a negative one."""
    at, c = f"stages.{name}.classes", spec.classes
    if c is None:
        return []
    if not recipe.data.conditional:
        return [(at, "training on a subset of classes needs class-conditional data (data.conditional: true)")]
    if len(set(c)) < len(c) or min(c) < 0:
        return [(at, f"classes are distinct labels ≥ 0, got {c}")]
    if recipe.data.kind == "digits" and max(c) > 9:
        return [(at, f"digits has classes 0 … 9, got {c}")]
    return []


def _network_of(recipe, name: str | None, seen: tuple = ()):
    """The network a training stage trains: its own `network`, else its teacher's (None: unknown)."""
    st = recipe.stages.get(name) if name else None
    if st is None or name in seen:
        return None
    net = getattr(st, "network", None)
    return net if net is not None else _network_of(recipe, one_input(st, "teacher"), (*seen, name))


def warm_start_problems(spec, recipe, name: str) -> list[Problem]:
    """A `warm_start` input that is not one model stage, or whose networks cannot start this stage's:
    its `net` (its network against this stage's) and, for a method that resumes networks, its fake
    critic (a copy of its teacher's network) and GAN head."""
    up = spec.inputs.get(WARM_START)
    if up is None:
        return []
    at = f"stages.{name}.inputs.{WARM_START}"
    if not isinstance(up, str):
        return [(at, "warm_start is one model stage, not a list")]
    if up not in recipe.stages:
        return []  # reported by the graph checks
    if recipe.model_method(up) is None:
        return [(at, f"stage {up!r} ({recipe.stages[up].kind}) makes no model")]
    mine, theirs = _network_of(recipe, name), _network_of(recipe, up)
    if mine is not None and theirs is not None and mine != theirs:
        return [(at, f"stage {up!r} trains another network than this stage: its weights cannot start this one")]
    if getattr(get_method(spec.method.name).Method, "resume", ()):
        a, b = one_input(spec, "teacher"), one_input(recipe.stages[up], "teacher")
        nets = _network_of(recipe, a), _network_of(recipe, b)
        if None not in nets and nets[0] != nets[1]:
            return [(at, f"stage {up!r} has a teacher ({b!r}) with another network than this stage's ({a!r}): "
                     "its fake critic cannot start this one's")]
        theirs_m = getattr(recipe.stages[up], "method", None)
        if getattr(spec.method, "gan", False) and getattr(theirs_m, "gan", False) \
                and spec.method.head_width != theirs_m.head_width:
            return [(at, f"stage {up!r} has another GAN head_width than this stage: its head cannot start this one's")]
    return []


def class_subset(data, classes: list[int] | None, where: str = "classes"):
    """The dataset restricted to `classes` (train and test splits; the class count is kept, so that
    label embeddings keep their size)."""
    if classes is None:
        return data
    if data.y is None or data.num_classes == 0:
        raise StageError(f"{where}: the data has no class labels")
    if max(classes) >= data.num_classes:
        raise StageError(f"{where}: classes {classes} outside 0 … {data.num_classes - 1}")
    keep = torch.as_tensor(classes)
    train, test = torch.isin(data.y, keep), torch.isin(data.y_test, keep)
    return dataclasses.replace(data, x=data.x[train], y=data.y[train], x_test=data.x_test[test], y_test=data.y_test[test])


def settings_problems(spec, recipe, name: str) -> list[Problem]:
    """A training stage's settings that could not run on this recipe's data and compute: its
    network (`stages.spec.network_problems`; the classifier builds its own from `method.width` and needs
    labels), a 2D noise source on other than 2D toy data, and a global batch the Ray workers cannot split
    evenly."""
    at, probs, data, method = f"stages.{name}", [], recipe.data, getattr(spec.method, "name", None)
    if method == "classifier":
        if spec.network is not None:
            probs.append((f"{at}.network", "method classifier builds its own network from method.width: "
                          "remove network"))
        if data.kind == "toy" and not (data.conditional or data.name == "labelled_mixture"):
            probs.append((f"{at}.method.name", "the classifier needs labelled data: toy data has labels with "
                          "data.conditional: true (or name labelled_mixture)"))
    elif spec.network is not None:
        probs += network_problems(spec.network, data, f"{at}.network")
    source = getattr(recipe.noise_of(name), "source", None)
    if source is not None and data.kind != "toy":
        probs.append((f"{at}.noise.source" if spec.noise is not None else "noise.source",
                      f"{source!r} draws 2D points: it needs 2D toy data, not data.kind {data.kind!r}"))
    workers = recipe.compute.num_workers
    if recipe.compute.backend == "ray" and spec.train.batch_size % workers:
        probs.append((f"{at}.train.batch_size", f"{spec.train.batch_size} does not split evenly over "
                      f"compute.num_workers = {workers} Ray workers"))
    return probs


def method_problems(spec, recipe, name: str) -> list[Problem]:
    """The stage's inputs against the roles its method declares (`Method.input_problems`: each role
    known, each required role given, input models trained with the right method), each input of
    the right kind of stage (and with an unconditional mode where the role needs one), and a noise
    process the method trains in."""
    m = get_method(spec.method.name).Method
    at = f"stages.{name}"
    given = {r: v for r, v in spec.inputs.items()
             if r != WARM_START and all(up in recipe.stages for up in stage_names(v))}
    probs = [(f"{at}.inputs.{line.split(': ', 1)[0]}", line.split(": ", 1)[1])
             for line in m.input_problems(spec.method, given, method_of=recipe.model_method)]
    for role, v in given.items():
        want = m.roles.get(role)
        if want is None:
            continue  # reported by input_problems
        for up in stage_names(v):
            st = recipe.stages[up]
            if want.kind == "pairs" and st.kind != "ode_pairs":
                probs.append((f"{at}.inputs.{role}", f"stage {up!r} ({st.kind}) makes no pair set: "
                              "this input needs an ode_pairs stage"))
            elif want.kind != "pairs" and recipe.model_method(up) is None:
                probs.append((f"{at}.inputs.{role}", f"stage {up!r} ({st.kind}) makes no model"))
            elif want.unconditional and not getattr(getattr(st, "method", None), "label_dropout", 0):
                probs.append((f"{at}.inputs.{role}", f"stage {up!r} has no unconditional mode: train it with "
                              "method.label_dropout > 0"))
            elif want.kind == "pairs" and (t := one_input(st, "teacher")) in recipe.stages:
                mine, theirs = (getattr(recipe.noise_of(s), "source", None) for s in (name, t))
                if mine != theirs:  # the pairs' noise is drawn from the teacher's source (noise.draw)
                    probs.append((f"{at}.inputs.{role}", f"the pairs of {up!r} start from the noise.source of "
                                  f"its teacher {t!r} ({theirs or 'standard normal'}), this stage's process from "
                                  f"{mine or 'standard normal'}: give both the same noise.source"))
    probs += [(f"{at}.{field}", msg) for field, msg in m.settings_problems(spec.method, spec.train)]
    process = recipe.noise_of(name).process
    if process not in m.processes:
        probs.append((f"{at}.noise.process" if spec.noise is not None else "noise.process",
                      f"method {spec.method.name!r} trains in the {' or '.join(m.processes)} process, not {process!r}"))
    return probs


def load_input(path: str | Path, device) -> object:
    """A model folder becomes a LoadedModel; a pair set becomes a dict of tensors."""
    path = Path(path)
    if (path / "model.json").exists():
        return load_model(path, device)
    if (path / "pairs.npz").exists():
        with np.load(path / "pairs.npz") as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    raise FileNotFoundError(f"{path}: neither a model (model.json) nor a pair set (pairs.npz)")


def build_method(recipe, stage: str, input_dirs: dict[str, list[str]], device="cpu"):
    """The stage's method, built from its (already validated) settings and loaded inputs."""
    spec = recipe.stages[stage]
    with phase("data"):
        data = class_subset(cached_data(recipe.data), getattr(spec, "classes", None),
                            f"{recipe.path}: stages.{stage}.classes")
    with phase("model_setup"):
        inputs = {}
        for role, dirs in input_dirs.items():
            loaded = [load_input(d, device) for d in dirs]
            inputs[role] = loaded[0] if isinstance(spec.inputs[role], str) else loaded
        start = inputs.pop(WARM_START, None)
        ctx = Context(data, recipe.noise_of(stage), spec.network, inputs, torch.device(device), recipe.seed,
                      steps=spec.train.steps)
        method = get_method(spec.method.name).Method(spec.method, ctx)
        if start is not None:
            method.nets["net"].load_state_dict(start.nets["net"].state_dict())
            for n, sd in load_resume(input_dirs[WARM_START][0], device).items():
                if n not in method.resume:
                    continue
                try:
                    method.nets[n].load_state_dict(sd)
                except RuntimeError:
                    raise StageError(f"{recipe.path}: stages.{stage}.inputs.{WARM_START}: its {n!r} network "
                                     f"(saved by {spec.inputs[WARM_START]!r}) does not fit this stage's") from None
        return method


def _dist_check(method) -> dict[str, float]:
    """Evidence of data-parallel training, gathered from every worker after the loop: how many
    distinct worker processes took part and how far their parameters diverged (0: gradients were
    averaged every step, so the replicas stayed identical although each drew its own batches)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    hi = torch.cat([p.detach().reshape(-1) for p in method.nets.parameters()])  # a fresh copy already
    lo = hi.clone()  # the elementwise max and min over the workers: 2 copies, not `world`
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    pids: list = [None] * world
    dist.all_gather_object(pids, os.getpid())
    return {"dist/workers": float(len(set(pids))), "dist/param_divergence": float((hi - lo).max())}


def fit(config: dict) -> None:
    """Per-worker training function (also called directly for local runs)."""
    t_fit = time.perf_counter()
    in_ray = config.get("ray", False)
    # phases of this call: the stage's own record when local, a fresh one on a Ray worker
    outer = current()
    with (nullcontext(outer) if outer is not None else recording()) as timings:
        _fit(config, t_fit, in_ray, timings)


def _fit(config: dict, t_fit: float, in_ray: bool, timings: dict) -> None:
    recipe = config["recipe"]
    if recipe.compute.threads:
        torch.set_num_threads(recipe.compute.threads)
    stage, spec = config["stage"], recipe.stages[config["stage"]]
    device = "cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu"
    if in_ray and device == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
        # the worker's own GPU as the current device, which NCCL's object collectives (all_gather_object)
        # use; Ray Train's TorchConfig sets it around this function too: said here, not relied on
        torch.cuda.set_device(device)
    torch.manual_seed(recipe.seed)  # network initialisation: the same in every run and on every worker
    method = build_method(recipe, stage, config["input_dirs"], device)
    rank, world = loop.rank_and_world()
    if world > 1:  # replicas start identical, as with DDP (gradients are then averaged every step)
        with torch.no_grad():
            for t in [*method.nets.parameters(), *method.nets.buffers()]:
                torch.distributed.broadcast(t, src=0)

    callback = _logger(config) if rank == 0 else None  # only rank 0 logs
    snapshots: dict[int, dict] = {}
    with phase("train"):
        try:
            states = loop.train(method, spec.train, config["ckpt_dir"], seed=recipe.seed, callback=callback,
                                progress=config.get("progress", True), snapshots=snapshots)
        except loop.NonFiniteLoss as e:
            if not in_ray:
                raise nonfinite_error(recipe, stage, str(e), e.checkpoint is not None) from None
            _report_nonfinite(e, rank, world)
            return
    facts = {"dist/world_size": float(world)}
    if world > 1:
        facts.update(_dist_check(method))
    if callback:
        callback(spec.train.steps, facts)

    def save(out):
        with phase("save"):
            for step, sd in [(None, states), *sorted(snapshots.items())]:
                where, extra = Path(out), method.meta()
                if step is not None:  # an EMA snapshot: a model folder of its own
                    where = snapshot_dir(out, step)
                    where.mkdir(parents=True)
                    decay = spec.train.snapshot_ema_decay
                    extra = {**extra, "snapshot": {"step": step,
                                                   "ema_decay": spec.train.ema_decay if decay is None else decay}}
                save_model(where, config["method_name"], method.cfg, method.net_cfgs, sd,
                           method.ctx.data.shape, method.ctx.data.num_classes, method.ctx.noise, extra)
            save_resume(Path(out), {n: method.nets[n].state_dict() for n in method.resume})

    if not in_ray:
        save(config["out"])
        return
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save(tmp)
            report = {"steps": spec.train.steps, **facts, "timing/fit": time.perf_counter() - t_fit,
                      **{f"timing/{k}": v for k, v in timings.items()}}
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({"steps": spec.train.steps, **facts})


# Ray Train defaults that cost seconds per stage on a short single-node job and buy nothing there.
# Applied (unless already set) only when this process starts its own local runtime; measured with
# bench/pipeline.py. FASTGEN_RAY_TUNING=default starts Ray as before, for comparison.
_LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",              # no usage-stats collection/reporting
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one actor process less (no preemptible nodes here)
    "RAY_TRAIN_METRICS_ENABLED": "0",            # no controller/worker metrics callbacks
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller polls workers every 0.5 s, not 2 s
}
# Ray prestarts one idle Python worker per CPU for the first driver; Ray Train's actors all run
# with a runtime_env and cannot use them, so on 2 cores they only compete with the real ones.
_LOCAL_RAY_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def _ray_init(compute) -> None:
    import ray

    if ray.is_initialized():
        return
    kw = dict(configure_logging=True, log_to_driver=True)
    if os.environ.get("RAY_ADDRESS"):  # an existing cluster (`ray start --head`, KubeRay): attach
        ray.init(**kw)
        return
    # a local runtime sized to the job
    kw.update(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, compute.num_workers * compute.cpus_per_worker))
    if os.environ.get("FASTGEN_RAY_TUNING", "fast") != "default":
        for k, v in _LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)
        kw["_system_config"] = _LOCAL_RAY_SYSTEM_CONFIG
    ray.init(**kw)


def _logger(config: dict):
    """The loop's callback on rank 0: logs to the stage's MLflow run (when tracked), and holds the
    `train` pause point of the fault tests (stages/timing.py) once a checkpoint exists."""
    client = None
    if config.get("run_id"):
        with phase("mlflow_worker"):
            from mlflow import MlflowClient

            client = MlflowClient(config["tracking_uri"])
            client.get_run(config["run_id"])  # opens the store now, not inside the first training step

    def callback(step, logs):
        if client is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            client.log_batch(config["run_id"], metrics=[Metric(k, v, ts, step) for k, v in logs.items()])
        if (Path(config["ckpt_dir"]) / "last.pt").exists():
            pause_point("train")

    return callback


def nonfinite_error(recipe, stage: str, message: str, kept: bool) -> StageError:
    """A non-finite loss (`loop.NonFiniteLoss`'s message; `kept`: a checkpoint was) as the stage's
    one-line error."""
    then = "; a rerun with unchanged settings resumes from it, changed settings start afresh" if kept else ""
    return StageError(f"{recipe.path}: stages.{stage}: {message}{then}")


NONFINITE = "nonfinite.json"


def _report_nonfinite(e: loop.NonFiniteLoss, rank: int, world: int) -> None:
    """On Ray Train workers: hand a non-finite loss to the driver as rank 0's last checkpoint, a
    `nonfinite.json` in the words of the worker whose loss it was, rather than failing every worker
    with a traceback."""
    import ray.train

    every = [e] * world
    if world > 1:
        torch.distributed.all_gather_object(every, e)
    first = min(every, key=lambda f: f.value is None)
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            (Path(tmp) / NONFINITE).write_text(json.dumps({"message": str(first), "kept": first.checkpoint is not None}))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def ray_settings(compute) -> dict:
    """TorchTrainer's scaling and process-group settings for `compute`: `num_workers` workers with
    `cpus_per_worker` CPUs each and, with `use_gpu`, one GPU each (a worker's device is then
    `ray.train.torch.get_device()`, see `_fit`) and the NCCL backend; gloo on CPU."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    per_worker = {"CPU": compute.cpus_per_worker, **({"GPU": 1} if compute.use_gpu else {})}
    return {"scaling_config": ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                            resources_per_worker=per_worker),
            "torch_config": TorchConfig(backend="nccl" if compute.use_gpu else "gloo")}


def ray_fit(config: dict, compute, out: Path, storage_path: str | None = None) -> dict:
    """Train on Ray Train workers; copy rank 0's checkpoint into `out`; return rank 0's last report."""
    with phase("ray_init"):
        _ray_init(compute)
    t0 = time.perf_counter()
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    name = f"{config['stage']}-{int(time.time())}"
    trainer = TorchTrainer(fit, train_loop_config={**config, "ray": True}, **ray_settings(compute),
                           run_config=RunConfig(name=name, storage_path=storage_path))
    try:
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        # the worker's own phases (data, model_setup, train, save, ...) happened inside trainer.fit;
        # what remains is Ray Train's fixed cost: worker start + imports, process group, reporting
        for k, v in metrics.items():
            if k.startswith("timing/") and k != "timing/fit":
                add_phase(k[len("timing/"):], v)
        add_phase("ray_trainer", time.perf_counter() - t0 - metrics.get("timing/fit", 0.0))
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run of stage {config['stage']!r} returned no checkpoint")
        with phase("checkpoint_copy"), result.checkpoint.as_directory() as d:
            if (Path(d) / NONFINITE).exists():
                said = json.loads((Path(d) / NONFINITE).read_text())
                raise nonfinite_error(config["recipe"], config["stage"], said["message"], said["kept"])
            shutil.copytree(d, out, dirs_exist_ok=True)  # the model and its snapshots/ folders
    finally:
        if storage_path:  # copied into `out`, or failed: drop Ray's run folder (local or on the object store)
            storage.remove(f"{storage_path.rstrip('/')}/{name}")
    return metrics


def run(ctx) -> None:
    """Run the training of stage `ctx.name` and write model.safetensors + model.json to ctx.out."""
    recipe, compute = ctx.recipe, ctx.recipe.compute
    ckpt = ctx.partial_dir()
    config = {
        "recipe": recipe, "stage": ctx.name,
        "method_name": recipe.stages[ctx.name].method.name,
        # the inputs the method takes (a smaller weak guide names its teacher without training on it)
        "input_dirs": {role: [str(i.path) for i in ins] for role, ins in ctx.inputs.items()
                       if role in get_method(ctx.spec.method.name).Method.roles or role == WARM_START},
        "ckpt_dir": str(ckpt), "out": str(ctx.out), "use_gpu": compute.use_gpu,
        "run_id": ctx.tracker.run_id, "tracking_uri": ctx.tracker.uri,
    }
    resumed = loop.checkpoint_step(ckpt)
    if resumed:
        print(f"[fastgen] {recipe.name}/{ctx.name}: resuming from step {resumed} of {ctx.spec.train.steps} "
              f"({ckpt})", file=sys.stderr)
        ctx.tracker.set_tags({"fastgen.resumed_from_step": resumed})
    if compute.backend == "ray":
        # Ray Train's run folder goes where the outputs go: s3://... (Ray's pyarrow S3 filesystem
        # reads the same AWS variables) or next to the resumable checkpoints
        remote = storage.is_remote(recipe.storage.root)
        ray_fit(config, compute, ctx.out,
                storage_path=storage.location(recipe, ".ray") if remote else str(ckpt.parent / "ray"))
    else:
        fit(config)
    # finished: the resumable state is no longer needed, nor that of attempts with other settings
    # (under the stage's lock, so none of them is in use)
    for old in ckpt.parent.glob(f"{ctx.name}-*"):
        if re.fullmatch(rf"{re.escape(ctx.name)}-[0-9a-f]{{16}}", old.name):
            shutil.rmtree(old, ignore_errors=True)

