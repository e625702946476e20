"""Training stages' shared runtime: build a method from a recipe stage and run the one loop,
in-process (`compute.backend: local`) or on Ray Train workers (`compute.backend: ray`).

Both paths call the same `fit(config)`; under Ray it is `TorchTrainer`'s per-worker function
(torch.distributed is initialised by Ray Train: gloo on CPU, NCCL on GPU) and rank 0 hands the
trained model back as a Ray Train checkpoint, which the driver copies into the stage output.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fastgen_core import loop
from fastgen_core.data import load_data
from fastgen_core.methods import get_method
from fastgen_core.methods.base import Context
from fastgen_core.models import load_model, save_model, snapshot_dir
from fastgen_core.noise import EDM
from fastgen_core.recipe import parse_recipe

from . import storage
from .runtime import _timings, add_phase, phase


@lru_cache(maxsize=4)
def _load_data_cached(data_json: str):
    from fastgen_core.config import DataConfig

    return load_data(DataConfig.model_validate_json(data_json))


def _data(data_json: str):
    with phase("data"):
        return _load_data_cached(data_json)


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
    spec = recipe.stages[stage]
    data = _data(recipe.data.model_dump_json())
    with phase("model_setup"):
        mcfg = recipe.method_config(stage)
        inputs = {}
        for role, dirs in input_dirs.items():
            loaded = [load_input(d, device) for d in dirs]
            inputs[role] = loaded[0] if isinstance(spec.inputs[role], str) else loaded
        ctx = Context(data, EDM(**recipe.noise.model_dump()), spec.network, inputs, torch.device(device), recipe.seed)
        return get_method(mcfg.name).Method(mcfg, ctx)


def _dist_check(method) -> dict[str, float]:
    """Evidence of data-parallel training, gathered from every worker after the loop: how many
    distinct worker processes took part and how far their parameters diverged (0: gradients were
    averaged every step, so the replicas stayed identical although each drew its own batches)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    flat = torch.cat([p.detach().reshape(-1) for p in method.nets.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    pids: list = [None] * world
    dist.all_gather_object(pids, os.getpid())
    return {"dist/workers": float(len(set(pids))),
            "dist/param_divergence": max(float((t - every[0]).abs().max()) for t in every)}


def fit(config: dict) -> None:
    """Per-worker training function (also called directly for local runs)."""
    t_fit = time.perf_counter()
    in_ray = config.get("ray", False)
    # phases of this call: the stage's own timings when local, a fresh record on a Ray worker
    token = _timings.set({}) if _timings.get() is None else None
    timings = _timings.get()
    recipe = parse_recipe(config["recipe"], config["recipe_path"])
    if recipe.compute.threads:
        torch.set_num_threads(recipe.compute.threads)
    stage, spec = config["stage"], recipe.stages[config["stage"]]
    device = "cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu"
    if in_ray and device == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
    torch.manual_seed(recipe.seed)  # network initialisation: the same in every run and on every worker
    method = build_method(recipe, stage, config["input_dirs"], device)
    rank, world = loop._world()
    if world > 1:  # replicas start identical, as with DDP (gradients are then averaged every step)
        with torch.no_grad():
            for t in [*method.nets.parameters(), *method.nets.buffers()]:
                torch.distributed.broadcast(t, src=0)

    callback, client = None, None
    if config.get("run_id") and rank == 0:  # only rank 0 logs
        with phase("mlflow_worker"):
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            client = MlflowClient(config["tracking_uri"])
            client.get_run(config["run_id"])  # opens the store now, not inside the first training step

        def callback(step, logs):
            ts = int(time.time() * 1000)
            client.log_batch(config["run_id"], metrics=[Metric(k, v, ts, step) for k, v in logs.items()])

    snapshots: dict[int, dict] = {}
    with phase("train"):
        states = loop.train(method, spec.train, config["ckpt_dir"], seed=recipe.seed, callback=callback,
                            progress=config.get("progress", True), snapshots=snapshots)
    facts = {"dist/world_size": float(world)}
    if world > 1:
        facts.update(_dist_check(method))
    if rank == 0 and callback:
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

    try:
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
    finally:
        if token is not None:
            _timings.reset(token)


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


def ray_fit(config: dict, compute, out: Path, storage_path: str | None = None) -> dict:
    """Train on Ray Train workers; copy rank 0's checkpoint into `out`; return rank 0's last report."""
    with phase("ray_init"):
        _ray_init(compute)
    t0 = time.perf_counter()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"{config['stage']}-{int(time.time())}"
    trainer = TorchTrainer(
        fit, train_loop_config={**config, "ray": True},
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker={"CPU": compute.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path))
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
        shutil.copytree(d, out, dirs_exist_ok=True)  # the model and its snapshots/ folders
    if storage_path:  # the copy is in `out`: drop Ray's run folder (local or on the object store)
        storage.remove(f"{storage_path.rstrip('/')}/{name}")
    return metrics


def train_stage(ctx) -> None:
    """Run the training of stage `ctx.name` and write model.safetensors + model.json to ctx.out."""
    recipe, compute = ctx.recipe, ctx.recipe.compute
    raw = recipe.model_dump(mode="json")
    ckpt = ctx.partial_dir()
    config = {
        "recipe": raw, "recipe_path": recipe.path, "stage": ctx.name,
        "method_name": recipe.stages[ctx.name].method["name"],
        "input_dirs": {role: [str(i.path) for i in ins] for role, ins in ctx.inputs.items()},
        "ckpt_dir": str(ckpt), "out": str(ctx.out), "use_gpu": compute.use_gpu,
        "run_id": ctx.tracker.run_id, "tracking_uri": ctx.tracker.uri,
    }
    if compute.backend == "ray":
        # Ray Train's run folder goes where the outputs go: s3://... (Ray's pyarrow S3 filesystem
        # reads the same AWS variables) or next to the resumable checkpoints
        remote = storage.is_remote(recipe.storage.root)
        ray_fit(config, compute, ctx.out,
                storage_path=storage.location(recipe, ".ray") if remote else str(ckpt.parent / "ray"))
    else:
        fit(config)
    shutil.rmtree(ckpt, ignore_errors=True)  # finished: the resumable state is no longer needed
