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
from fastgen_core.models import load_model, save_model
from fastgen_core.noise import EDM
from fastgen_core.recipe import parse_recipe


@lru_cache(maxsize=4)
def _data(data_json: str):
    from fastgen_core.config import DataConfig

    return load_data(DataConfig.model_validate_json(data_json))


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
    mcfg = recipe.method_config(stage)
    inputs = {}
    for role, dirs in input_dirs.items():
        loaded = [load_input(d, device) for d in dirs]
        inputs[role] = loaded[0] if isinstance(spec.inputs[role], str) else loaded
    ctx = Context(data, EDM(**recipe.noise.model_dump()), spec.network, inputs, torch.device(device), recipe.seed)
    return get_method(mcfg.name).Method(mcfg, ctx)


def fit(config: dict) -> None:
    """Per-worker training function (also called directly for local runs)."""
    recipe = parse_recipe(config["recipe"], config["recipe_path"])
    stage, spec = config["stage"], recipe.stages[config["stage"]]
    in_ray = config.get("ray", False)
    device = "cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu"
    if in_ray and device == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
    method = build_method(recipe, stage, config["input_dirs"], device)

    callback = None
    if config.get("run_id"):
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(config["tracking_uri"])

        def callback(step, logs):
            ts = int(time.time() * 1000)
            client.log_batch(config["run_id"], metrics=[Metric(k, v, ts, step) for k, v in logs.items()])

    states = loop.train(method, spec.train, config["ckpt_dir"], seed=recipe.seed, callback=callback,
                        progress=config.get("progress", True))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def save(out):
        save_model(Path(out), config["method_name"], method.cfg, method.net_cfgs, states,
                   method.ctx.data.shape, method.ctx.data.num_classes, method.ctx.noise, method.meta())

    if not in_ray:
        save(config["out"])
        return
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save(tmp)
            ray.train.report({"steps": spec.train.steps}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({"steps": spec.train.steps})


def _ray_init(compute) -> None:
    import ray

    if ray.is_initialized():
        return
    kw = dict(include_dashboard=False, configure_logging=True, log_to_driver=True)
    if not os.environ.get("RAY_ADDRESS"):  # local runtime sized to the job
        kw["num_cpus"] = max(os.cpu_count() or 1, compute.num_workers * compute.cpus_per_worker)
    ray.init(**kw)


def ray_fit(config: dict, compute, out: Path, storage_path: str | None = None) -> None:
    _ray_init(compute)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        fit, train_loop_config={**config, "ray": True},
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker={"CPU": compute.cpus_per_worker}),
        run_config=RunConfig(name=f"{config['stage']}-{int(time.time())}", storage_path=storage_path))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run of stage {config['stage']!r} returned no checkpoint")
    with result.checkpoint.as_directory() as d:
        for p in Path(d).iterdir():
            if p.is_file():
                shutil.copy2(p, out / p.name)


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
        ray_fit(config, compute, ctx.out, storage_path=str(ckpt.parent / "ray"))
    else:
        fit(config)
    shutil.rmtree(ckpt, ignore_errors=True)  # finished: the resumable state is no longer needed
