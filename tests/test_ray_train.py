"""The teacher stage of the tiny recipe on Ray Train (`compute: {backend: ray, num_workers: 2}`),
on a local Ray runtime that `stages.train._ray_init` starts with 2 CPUs and this module shuts
down: the checkpoint loads and samples well, the loss went down, and the two workers really
trained one model data-parallel (two processes, world size 2, replicas identical at the end)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
import torch

from fastgen_core import artifacts
from fastgen_core import metrics as M
from fastgen_core.data import load_data
from fastgen_core.models import load_model
from stages.recipe import load_recipe
from stages.runtime import TIMING_PREFIX, run_stage, stage_dir

# one local Ray runtime at a time: under pytest-xdist every Ray test runs on the same worker
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def ray_teacher(tiny_recipe_session):
    import ray

    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)  # a local runtime, not some cluster from the environment
    mp.setenv("FASTGEN_INVOCATION", "test-ray-teacher")
    if ray.is_initialized():
        ray.shutdown()
    path = tiny_recipe_session("ray", only=["teacher"], compute={"backend": "ray", "num_workers": 2},
                               stages={"teacher": {"train": {"snapshots": [200]}}})  # an EMA snapshot comes back too
    recipe = load_recipe(path)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            manifest = run_stage(recipe, "teacher")
        cpus = ray.cluster_resources().get("CPU")
    finally:
        sys.stderr.write(err.getvalue()[-5000:])
        ray.shutdown()
        mp.undo()
    line = [ln for ln in err.getvalue().splitlines() if ln.startswith(TIMING_PREFIX)][-1]
    return recipe, manifest, cpus, json.loads(line[len(TIMING_PREFIX):])


def test_local_ray_runtime_was_small_and_is_shut_down(ray_teacher):
    import ray

    _, _, cpus, _ = ray_teacher
    assert cpus == 2  # 2 workers x 1 CPU on the 2-core machine: the runtime _ray_init sized
    assert not ray.is_initialized()


def test_checkpoint_loads_and_samples_the_data(ray_teacher):
    recipe, manifest, _, _ = ray_teacher
    out = stage_dir(recipe, "teacher")
    assert artifacts.verify(out)["digest"] == manifest["digest"]
    assert set(manifest["files"]) == {"model.safetensors", "model.json",
                                      *{f"snapshots/step_000200/model.{x}" for x in ("safetensors", "json")}}
    model = load_model(out)
    assert model.meta["method"] == "edm" and model.shape == (2,)
    data = load_data(recipe.data)
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(123))
    x = model.sample(z, 35)  # Heun, 18 steps
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    got = M.toy_metrics(x, data.density, data.x_test)
    # baselines: the noise the sampler starts from, and the best single Gaussian (data mean/std)
    noise = M.toy_metrics(recipe.noise.sigma_max * z, data.density, data.x_test)
    g = torch.randn(1000, 2, generator=torch.Generator().manual_seed(7))
    gauss = M.toy_metrics(g * data.x.std(0) + data.x.mean(0), data.density, data.x_test)
    assert got["swd"] < 0.01 * noise["swd"]
    assert got["swd"] < 0.5 * gauss["swd"], (got, gauss)
    assert got["mode_coverage"] >= 0.75, got  # samples land on (nearly) all 8 modes
    assert got["off_support"] < 0.6 * gauss["off_support"], (got, gauss)


def test_two_workers_trained_one_model_data_parallel(ray_teacher):
    from mlflow import MlflowClient

    recipe, manifest, _, _ = ray_teacher
    client = MlflowClient(recipe.tracking.uri)
    run_id = manifest["mlflow"]["run_id"]
    steps = recipe.stages["teacher"].train.steps
    last = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
            for k in ("dist/world_size", "dist/workers", "dist/param_divergence")}
    assert last["dist/world_size"] == [(steps, 2.0)]  # torch.distributed group of 2
    assert last["dist/workers"] == [(steps, 2.0)]  # two distinct worker processes
    # each worker drew its own half-batches, yet the replicas ended bit-identical: gradients were
    # all-reduced every step (without it they would drift apart)
    assert last["dist/param_divergence"] == [(steps, 0.0)]
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "net/loss"), key=lambda m: m.step)]
    every = recipe.stages["teacher"].train.log_every
    assert len(loss) == steps // every and all(math.isfinite(v) for v in loss)
    assert sum(loss[-3:]) / 3 < 0.85 * sum(loss[:3]) / 3  # the loss went down


def test_ray_phases_are_timed_and_a_rerun_skips_ray(ray_teacher, capfd):
    recipe, _, _, timing = ray_teacher
    ph = timing["phases"]
    assert timing["backend"] == "ray" and not timing["skipped"]
    for k in ("run/ray_init", "run/ray_trainer", "run/train", "mlflow_setup", "run"):
        assert ph[k] > 0, k
    assert ph["run/ray_init"] + ph["run/ray_trainer"] + ph["run/train"] <= ph["run"] + 1e-3
    # a rerun is up to date: digests checked, no Ray started
    capfd.readouterr()
    run_stage(recipe, "teacher")
    line = [ln for ln in capfd.readouterr().err.splitlines() if TIMING_PREFIX in ln][-1]
    rec = json.loads(line.split(TIMING_PREFIX, 1)[1])
    assert rec["skipped"] and not any(k.startswith("run") for k in rec["phases"])
