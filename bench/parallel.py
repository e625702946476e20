"""Several toy pipelines at once against one MLflow server and one S3 bucket, against one alone.

Starts the same real servers the tests use (tests/servers.py): moto in server mode on 127.0.0.1
(the S3 endpoint, found through the standard AWS variables) and an `mlflow server` (SQLite
backend, artifacts proxied to s3://<bucket>/mlflow). Each pipeline is params/toy_cd.yaml scaled
down (bench/pipeline.py `tiny`), with its own name, seed and storage prefix in the one bucket, run
stage by stage in one process (`run_stage`, as the tests do; one MLflow parent run per pipeline).

First one pipeline alone, then N at once. Afterwards, for every pipeline: one FINISHED parent run
and one FINISHED child per stage, each child pointed at by its manifest; each stage's
manifest metrics logged; every training stage's loss curve complete (one point per log step);
the evaluation's metrics.json and plots listed by MLflow and present in the bucket byte for byte;
every stage's stored objects match their manifest (`fastgen verify` of the recipe).

    python bench/parallel.py            # N=4; writes bench/results/parallel.json
    python bench/parallel.py --n 2 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests"))  # `tests` itself may name an installed package

from bench.pipeline import tiny  # noqa: E402
from servers import BIN, BUCKET, free_port, start, stop, wait_http  # noqa: E402


def servers(tmp: Path, procs: list) -> tuple[dict, str]:
    """moto + mlflow server (appended to `procs` as they start); the AWS environment and the
    tracking URI."""
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_CONFIG_FILE": str(tmp / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")}
    os.environ.update(env)
    moto = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp / "moto.log")
    procs.append(moto)
    wait_http(f"{env['AWS_ENDPOINT_URL']}/", moto, tmp / "moto.log", 120)
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    mport = free_port()
    ml = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts", "--workers", "1"],
               tmp / "mlflow.log", {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    procs.append(ml)
    uri = f"http://127.0.0.1:{mport}"
    wait_http(f"{uri}/health", ml, tmp / "mlflow.log", 300)
    return env, uri


def write_recipe(tmp: Path, name: str, seed: int, root: str, uri: str) -> Path:
    raw = tiny(yaml.safe_load((PROJECT / "params/toy_cd.yaml").read_text()))
    raw.update(name=name, seed=seed, storage={"root": root}, tracking={"uri": uri})
    raw.setdefault("compute", {})["threads"] = 1
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def run_pipeline(path: str) -> None:
    """(child process) every stage of the recipe in order, in this process."""
    from stages.recipe import load_recipe
    from stages.runtime import run_stage

    r = load_recipe(path)
    for s in r.order():
        run_stage(r, s)


def launch(paths: list[Path], tmp: Path) -> tuple[float, list[float]]:
    """Run the pipelines as concurrent processes; wall time of all and of each."""
    t0 = time.perf_counter()
    procs = []
    for p in paths:
        env = {**os.environ, "FASTGEN_INVOCATION": f"bench-{p.stem}-{uuid.uuid4().hex[:6]}",
               "FASTGEN_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
        log = (tmp / f"{p.stem}.log").open("w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--run-pipeline", str(p)], cwd=PROJECT,
                                       env=env, stdout=log, stderr=subprocess.STDOUT), p))
    walls = []
    for proc, p in procs:
        if proc.wait() != 0:
            raise SystemExit(f"pipeline {p.stem} failed:\n{(tmp / f'{p.stem}.log').read_text()[-4000:]}")
        walls.append(time.perf_counter() - t0)
    return time.perf_counter() - t0, walls


def check(path: Path, uri: str) -> dict:
    """Everything of one pipeline present in MLflow and the bucket, and every digest verifying."""
    import s3fs
    from mlflow import MlflowClient

    from stages.recipe import load_recipe
    from stages import lineage, storage

    r = load_recipe(path)
    client, fs = MlflowClient(uri), s3fs.S3FileSystem()
    exp = client.get_experiment_by_name(r.name).experiment_id
    parents = client.search_runs([exp], "tags.`fastgen.level` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", r.name
    kids = {k.data.tags["fastgen.stage"]: k for k in
            client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")}
    assert sorted(kids) == sorted(r.order()), (r.name, sorted(kids))
    n_metrics = n_points = n_artifacts = 0
    for s in r.order():
        run, m = kids[s], storage.read_manifest(storage.location(r, s))
        assert run.info.status == "FINISHED" and m["mlflow"]["run_id"] == run.info.run_id, (r.name, s)
        assert run.data.tags["fastgen.output_digest"] == m["digest"]
        want = {k.replace("@", "_at_"): v for k, v in m["metrics"].items()  # numbers: MLflow metrics
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert all(abs(run.data.metrics[k] - float(v)) < 1e-9 for k, v in want.items()), (r.name, s)
        n_metrics += len(run.data.metrics)
        train = r.stages[s].train if r.stages[s].kind in ("teacher", "distill") else None
        if train:
            hist = client.get_metric_history(run.info.run_id, "net/loss")
            steps = list(range(train.log_every, train.steps + 1, train.log_every))
            steps += [] if train.steps in steps else [train.steps]
            assert sorted(h.step for h in hist) == steps, (r.name, s)
            n_points += len(hist)
    ev = kids[r.order()[-1]]
    listed = [a.path for a in client.list_artifacts(ev.info.run_id)] + \
             [a.path for a in client.list_artifacts(ev.info.run_id, "plots")]
    assert "metrics.json" in listed and any(p.endswith(".png") for p in listed), listed
    stored = f"s3://{BUCKET}/mlflow/{ev.info.artifact_uri.split('mlflow-artifacts:/', 1)[1]}"
    local = storage.fetch(storage.location(r, r.order()[-1]))[0]
    for a in listed:
        if a.endswith((".json", ".png")):
            assert fs.cat_file(f"{stored}/{a}") == (local / a).read_bytes(), a
            n_artifacts += 1
    problems, n = lineage.verify_target(str(path))
    assert not problems and n == len(r.order()), problems
    return {"recipe": r.name, "runs": 1 + len(kids), "metrics": n_metrics, "loss_points": n_points,
            "mlflow_artifacts_checked": n_artifacts, "artifacts_verified": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="pipelines at once")
    ap.add_argument("--out", default=str(PROJECT / "bench/results/parallel.json"))
    ap.add_argument("--run-pipeline", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_pipeline:
        run_pipeline(a.run_pipeline)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="fastgen-concurrent-"))
    procs = []
    try:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        env, uri = servers(tmp, procs)
        t_servers = time.perf_counter() - t0
        tag = uuid.uuid4().hex[:6]
        root = f"s3://{BUCKET}/bench-{tag}/outputs"
        alone = [write_recipe(tmp, f"alone_{tag}", 0, root, uri)]
        many = [write_recipe(tmp, f"conc_{tag}_{i}", i, root, uri) for i in range(a.n)]
        wall_alone, _ = launch(alone, tmp)
        wall_many, each = launch(many, tmp)
        checks = [check(p, uri) for p in alone + many]
        res = {"n": a.n, "wall_one_alone_s": round(wall_alone, 2), "wall_n_at_once_s": round(wall_many, 2),
               "wall_each_at_once_s": [round(w, 2) for w in each],
               "slowdown_vs_alone": round(wall_many / wall_alone, 2),
               "throughput_gain": round(a.n * wall_alone / wall_many, 2),
               "servers_start_s": round(t_servers, 2), "cpus": os.cpu_count(),
               "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg(), "checks": checks}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(f"one pipeline alone: {wall_alone:.1f} s;  {a.n} at once: {wall_many:.1f} s "
              f"(each done at {', '.join(f'{w:.1f}' for w in each)} s); {res['slowdown_vs_alone']}x the wall "
              f"time of one for {a.n}x the work")
        for c in checks:
            print(f"  {c['recipe']}: {c['runs']} runs, {c['metrics']} metrics, {c['loss_points']} loss points, "
                  f"{c['mlflow_artifacts_checked']} MLflow artifacts in S3, {c['artifacts_verified']} artifacts verified")
        print(f"wrote {a.out}")
        return 0
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
