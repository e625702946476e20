"""Every shipped recipe (params/*.yaml), shrunk to a tiny size, runs end to end through the Prefect
flow (Prefect's test harness), and the small ones also through `dvc repro` (a real git + DVC
repository in a temp dir), where the two give bit-identical artifacts stage by stage.

Shrinking keeps each recipe's stage graph, methods and method settings and cuts only sizes:
training steps and batch sizes, pair counts, evaluation samples, seeds and NFEs, and the U-Nets
(width, embedding, blocks, levels). Image recipes read a small dataset the test writes in the real
on-disk format (CIFAR-10's python batches, or an image folder of PNG files), read at 16 pixels.
Adding a recipe to params/ adds it to this test with no code change.

Paper-scale recipes (params/cifar10_*.yaml, params/imagenet64_*.yaml: GPU-sized, `compute: ray`)
run shrunk through the Prefect flow only (the same stage code `dvc repro` runs; the flow/dvc
identity is checked on the small recipes) and validate at full size. Shrinking also cuts a
progressive group's rounds to those other stages name (cifar10_guided's 1024 -> 1 to 16 -> 1),
trains in fp32 what a recipe trains under bf16 autocast except in `imagenet64_dmd2` (BF16_KEPT: this
CPU has no native bf16 convolution, so autocast made shrunk `imagenet64_msd` 3.4x slower; the kept
recipe runs DMD2's losses and GAN head under bf16 through the flow, tests/test_gpu_path.py the loop's
bf16 path itself),
explicit class groups of a students group to two students on the test data's classes
(imagenet64_msd), scales LowDiff's cascade of resolutions with the image side (cifar10_lowdiff's
8, 16, 32 -> 4, 8, 16), and, for these recipes, the evaluation's deterministic-map metrics to 64 paths
(`stages.evaluate.N_MAP`; unconditional data draws all 2000).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from fastgen_core import artifacts
from image_data import write_cifar10
from stages.recipe import load_recipe
from stages.runtime import stage_dir
from stages.spec import stage_names

ROOT = Path(__file__).resolve().parent.parent
# FASTGEN_TEST_RECIPES=toy_cd,toy_ayf narrows the run while developing a recipe
RECIPES = [f for f in sorted((ROOT / "params").glob("*.yaml"))
           if not os.environ.get("FASTGEN_TEST_RECIPES") or f.stem in os.environ["FASTGEN_TEST_RECIPES"].split(",")]


def _shrink_train(t: dict, batch: int = 64, steps: int = 8) -> None:
    t["steps"] = min(t.get("steps", 2000), steps)
    t["batch_size"] = min(t.get("batch_size", 256), batch)
    t.update(log_every=4, ckpt_every=1000)
    if t.get("lr_warmup"):
        t["lr_warmup"] = 2
    if "snapshots" in t:
        t["snapshots"] = [min(s, 4) for s in t["snapshots"]]


SMALL_UNET = {"width": 16, "emb_dim": 32, "depth": 1, "levels": 2}


def _shrink_network(n: dict, sides: tuple[int, int] | None) -> None:
    """A U-Net at most 16 channels wide, 32-wide embedding, one block per level and its first two
    levels; dropout kept. Attention stays at the levels that remain: with `sides` = (the recipe's
    image side, the shrunk one), side r at level log2(side0 / r) becomes that level's side at the
    shrunk resolution; levels cut away lose theirs. MLPs and classifiers are left as they are
    (already small)."""
    if n.get("arch") != "unet":
        return
    n["width"] = min(n.get("width", 256), SMALL_UNET["width"])
    n["emb_dim"] = min(n.get("emb_dim", 128), SMALL_UNET["emb_dim"])
    n["depth"] = SMALL_UNET["depth"]
    n["channel_mult"] = n.get("channel_mult", [1, 2])[: SMALL_UNET["levels"]]
    attn = n.pop("attn_resolutions", None)
    if attn and sides and sides[0] and sides[1]:
        levels = {(sides[0] // r).bit_length() - 1 for r in attn}
        kept = sorted((sides[1] >> lv for lv in levels if lv < len(n["channel_mult"])), reverse=True)
        if kept:
            n["attn_resolutions"] = kept


BF16_KEPT = "imagenet64_dmd2"  # the one recipe whose shrunk stages keep `train.precision: bf16`


def _shrink_settings(node: dict, sides: tuple[int, int] | None = None, bf16: bool = False) -> None:
    """Training and pair-solving settings and networks anywhere in a stage's settings: a group kind
    (rounds, students) nests them (e.g. a students group's `tsm.train`). `bf16`: keep bf16 autocast
    (else a bf16 `train.precision` becomes fp32)."""
    paper_images = bool(sides and (sides[0] or 0) >= 32)  # images written at 32 px or more (paper-scale recipes)
    for key, v in node.items():
        if not isinstance(v, dict):
            continue
        if key == "train":  # paper-scale images: 4 steps at batch 8 (CPU time of the shrunk paper-scale recipes)
            _shrink_train(v, *((8, 4) if paper_images else (64, 8)))
            if v.get("precision") == "bf16" and not bf16:
                v["precision"] = "fp32"
        elif key == "pairs":  # paper-scale images: 16 pairs (RK45 on a U-Net costs ~100 evaluations a batch)
            v.update(n_pairs=16 if paper_images else 64, steps=min(v.get("steps", 18), 4))
        elif key == "network":  # a copy: YAML anchors (`network: *net`) share one dict between stages
            node[key] = dict(v)
            _shrink_network(node[key], sides)
        else:
            _shrink_settings(v, sides, bf16)


# Test-written image datasets (one per test process): CIFAR-10's on-disk format, and an image folder
TEST_DATA: dict[str, Path] = {}


def written_dataset(name: str, base: Path) -> Path:
    """The root of a small dataset in `name`'s on-disk format, written under `base` once."""
    if name not in TEST_DATA:
        if name == "cifar10":
            TEST_DATA[name] = write_cifar10(base / "cifar10", n_train=200, n_test=50)
        elif name == "folder":
            from fastgen_core.shapes import write_shapes_folder

            TEST_DATA[name] = write_shapes_folder(base / "shapes", n_per_class=24)
        else:
            raise ValueError(f"no test dataset for image data {name!r}")
    return TEST_DATA[name]


def with_test_data(raw: dict, base: Path) -> dict:
    """`raw` reading a test-written dataset in its image format (other data unchanged)."""
    data = raw.get("data", {})
    if data.get("kind") == "images":
        data["root"] = str(written_dataset(data.get("name", "folder"), base))
    return raw


def _shrink_data(data: dict) -> tuple[int, int] | None:
    """Cut toy sample counts, and image data over 16 pixels a side (CIFAR-10, 64-pixel recipes) to 16;
    returns (image side as written, shrunk side) for image data (None otherwise)."""
    kind = data.get("kind", "toy")
    if kind == "toy":
        data["n_train"], data["n_test"] = min(data.get("n_train", 20000), 1000), min(data.get("n_test", 5000), 300)
        return None
    if kind == "digits":
        return 8, 8
    side = data.get("resolution") or {"cifar10": 32, "folder": 16, "mnist": 28}.get(data.get("name"))
    if side and side > 16:
        data["resolution"] = 16
    return side, data.get("resolution") or side


def _named(r: dict) -> set[str]:
    """Every string in the stages' inputs and guidance rows (the stage names other stages use)."""
    def walk(v) -> set[str]:
        if isinstance(v, str):
            return {v}
        return set().union(*map(walk, v.values() if isinstance(v, dict) else v if isinstance(v, list) else []))
    return set().union(*(walk([s.get("inputs", {}), (s.get("evaluate") or {}).get("guidance", [])])
                         for s in r["stages"].values()))


def shrink(raw: dict) -> dict:
    """The same recipe at a size that runs in seconds (see module docstring)."""
    r = copy.deepcopy(raw)
    sides = _shrink_data(r.setdefault("data", {}))
    named = _named(r)
    for stage, spec in r["stages"].items():
        rounds = spec.get("rounds") if spec.get("kind") == "progressive" else None
        if rounds:  # only the rounds other stages name (pd_8 … pd of 1024 -> 1): the first teacher at 2·N
            ns = [int(n[len(stage) + 1:]) for n in named if n.startswith(stage + "_") and n[len(stage) + 1:].isdigit()]
            rounds["teacher_steps"] = min(rounds["teacher_steps"], 2 * max([rounds.get("student_steps", 1), *ns]))
        students = spec.get("students") or {}
        if isinstance(students.get("partition"), list):  # explicit groups (ImageNet's 1000 classes): 2 students
            from fastgen_core.methods.router import contiguous  # on the test data's classes (folder: 4 shapes)
            from fastgen_core.shapes import CLASSES

            students.update(k=2, partition=contiguous(10 if r["data"].get("name") == "cifar10" else len(CLASSES), 2))
        if spec.get("kind") in ("teacher", "distill", "feature_net", "weak_snapshot"):
            spec.setdefault("train", {})  # only training kinds take `train`
        _shrink_settings(spec, sides, bf16=r.get("name") == BF16_KEPT)
        if spec.get("kind") == "evaluate":
            ev = spec.setdefault("evaluate", {})
            ev.update(n_samples=64, seeds=[0], nfe=[1, 2], teacher_nfe=[1, 3], plots=False, inception_fid=False)
        m = spec.get("method") or {}
        if "K" in m:
            m["K"] = 8
        if m.get("low_nfe"):  # lowdiff: one evaluation at each lower resolution (the evaluation's NFEs are cut too)
            m["low_nfe"] = [1] * len(m["low_nfe"])
        if m.get("resolutions") and sides and sides[0] != sides[1]:  # lowdiff's cascade, scaled to the shrunk side
            m["resolutions"] = [r * sides[1] // sides[0] for r in m["resolutions"]]
        if m.get("name") == "ctm":  # at most 3 teacher steps per iteration (CIFAR's default is 17)
            m["max_teacher_steps"] = min(m.get("max_teacher_steps") or m.get("N", 18) - 1, 3)
        if "step" in (spec.get("guide") or {}):  # weak_snapshot: the teacher's (shrunk) snapshot step
            spec["guide"]["step"] = 4
        if "edit" in spec:
            spec["edit"] = {**spec["edit"], "n_images": min(spec["edit"].get("n_images", 16), 8)}
    r["compute"] = {"backend": "local", "threads": 1}
    return r


def write_shrunk(folder: Path, storage_root: str, tracking: dict, recipe: Path, data_base: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = shrink(with_test_data(yaml.safe_load(recipe.read_text()), data_base))
    raw["storage"] = {"root": storage_root}
    raw["tracking"] = tracking
    p = folder / recipe.name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


# One recipe's runs are cached per test process: under pytest-xdist every test of a recipe runs on
# the same worker (its xdist_group), so the flow and `dvc repro` run once per recipe, and recipes
# spread over the workers.
_FLOW: dict[str, tuple] = {}
_DVC: dict[str, tuple] = {}
PER_RECIPE = [pytest.param(f, id=f.stem, marks=pytest.mark.xdist_group(f"recipe-{f.stem}")) for f in RECIPES]
PAPER_SCALE = ("cifar10_", "imagenet64_")  # GPU-sized recipes: shrunk through the flow only; the rest also through DVC


def paper_scale(recipe: Path) -> bool:
    return recipe.stem.startswith(PAPER_SCALE)


def flow_run(recipe: Path, tmp_path_factory, mlflow_template) -> tuple:
    """The shrunk recipe through the Prefect flow, with its own MLflow store."""
    if recipe.stem not in _FLOW:
        from flows.pipeline import pipeline

        root = tmp_path_factory.mktemp(f"flow-{recipe.stem}")
        shutil.copy(mlflow_template, root / "mlflow.db")
        p = write_shrunk(root / "params", str(root / "outputs"), {"uri": f"sqlite:///{root / 'mlflow.db'}"}, recipe,
                         tmp_path_factory.getbasetemp() / "data")
        saved = os.environ.pop("FASTGEN_INVOCATION", None)
        try:  # paper-scale (flow only): the deterministic-map metrics on 64 paths, not 2000 (unconditional: all of them)
            with mock.patch("stages.evaluate.N_MAP", 64) if paper_scale(recipe) else contextlib.nullcontext():
                _FLOW[recipe.stem] = (root, p, pipeline(load_recipe(p), recipe_path=str(p)))
        finally:
            if saved is not None:
                os.environ["FASTGEN_INVOCATION"] = saved
    return _FLOW[recipe.stem]


def dvc_repo(recipe: Path, tmp_path_factory, route) -> tuple:
    """The shrunk recipe in its own git + DVC repository, `dvc repro` once (tracking off: MLflow is
    tested elsewhere and costs seconds per stage process). Through `route` (the `stage_forkserver`
    fixture) its stage commands run in a warm interpreter's children instead of fresh processes:
    the same commands, 3× faster (tests/forkserver.py)."""
    if recipe.stem not in _DVC:
        d = tmp_path_factory.mktemp(f"dvc-{recipe.stem}")
        for sub in ("fastgen_core", "stages", "flows"):
            shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
        p = write_shrunk(d / "params", "outputs", {"enabled": False}, recipe, tmp_path_factory.getbasetemp() / "data")
        (d / ".gitignore").write_text("__pycache__/\n")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(d),
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
        env.pop("FASTGEN_INVOCATION", None)
        env = route(env)

        def sh(*cmd):
            r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            return r.stdout + r.stderr

        sh("python", "-m", "stages.dvcgen")  # `python` on env's PATH: through the warm interpreter too
        sh("git", "init", "-q")
        sh("dvc", "init", "-q")
        sh("git", "add", "-A")
        sh("git", "commit", "-qm", "init")
        _DVC[recipe.stem] = (d, p, sh, sh("dvc", "repro"))
    return _DVC[recipe.stem]


def test_every_recipe_validates_and_is_in_dvc_yaml(tmp_path_factory):
    """At full size; a recipe on a local image dataset reads the test-written one (a fresh clone has
    no data/), a remote one (the paper-scale recipes' s3:// placeholders) is validated as written."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for f in RECIPES:
        raw = yaml.safe_load(f.read_text())
        if raw.get("data", {}).get("kind") == "images" and "://" not in raw["data"].get("root", ""):
            p = tmp_path_factory.mktemp("full") / f.name
            raw = with_test_data(raw, tmp_path_factory.getbasetemp() / "data")
            p.write_text(yaml.safe_dump(raw, sort_keys=False))
            f = p
        r = load_recipe(f)
        assert all(f"{r.name}-{s}" in dvc for s in r.stages), f.name


@pytest.mark.parametrize("recipe", PER_RECIPE)
def test_recipe_runs_through_the_flow(recipe, prefect_harness, tmp_path_factory, mlflow_template):
    from mlflow import MlflowClient

    root, p, results = flow_run(recipe, tmp_path_factory, mlflow_template)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    r = load_recipe(p)
    assert list(results) == r.order()
    for s in r.stages:
        m = artifacts.verify(stage_dir(r, s))
        assert m["digest"] == results[s]["digest"] and m["mlflow"]["run_id"], s
    exp = client.get_experiment_by_name(r.name)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(x.data.tags.get("fastgen.stage", "") for x in runs if x.data.tags.get("fastgen.level") == "stage") \
        == sorted(r.stages)
    assert all(x.info.status == "FINISHED" for x in runs)
    # every evaluation scored each of its rows (its `models` and its guidance rows), and its figures
    # hang together: one floor per metric for the stage, above floor = mean − floor (6 decimals each)
    for s, st in r.stages.items():
        if st.kind != "evaluate":
            continue
        res = json.loads((stage_dir(r, s) / "metrics.json").read_text())
        given = set(stage_names(st.inputs["models"])) | {g.row for g in st.evaluate.guidance}
        scored = {k for k, v in res.items() if isinstance(v, dict) and any(n.startswith("nfe_") for n in v)}
        assert given and given <= scored, (s, given, scored)
        floors: dict[str, set] = {}
        for model in scored:
            for nfe, cells in res[model].items():
                if not nfe.startswith("nfe_"):
                    continue
                for metric, c in cells.items():
                    if isinstance(c, dict) and {"mean", "floor_mean", "above_floor"} <= set(c):
                        floors.setdefault(metric, set()).add(c["floor_mean"])
                        assert c["above_floor"] == pytest.approx(c["mean"] - c["floor_mean"], abs=2e-6), \
                            (s, model, nfe, metric, c)
        assert floors and all(len(f) == 1 for f in floors.values()), (s, floors)


@pytest.mark.parametrize("recipe", [p for p in PER_RECIPE if not paper_scale(p.values[0])])
def test_recipe_runs_through_dvc_repro_identically(recipe, prefect_harness, tmp_path_factory, mlflow_template,
                                                   stage_forkserver):
    d, p, sh, first = dvc_repo(recipe, tmp_path_factory, stage_forkserver)
    _, _, results = flow_run(recipe, tmp_path_factory, mlflow_template)
    r = load_recipe(p)
    assert set(re.findall(r"Running stage '([^']+)'", first)) == {f"{r.name}-{s}" for s in r.stages}
    for s, res in results.items():
        m = artifacts.verify(d / "outputs" / r.name / s)
        # same code, same params, same seeds: DVC's stage processes and the flow's tasks agree bit for bit
        assert m["digest"] == res["digest"], f"{r.name}/{s}: dvc and flow outputs differ"
    assert not re.findall(r"Running stage", sh("dvc", "repro"))


def _tangent_users(d: Path) -> set[str]:
    """Method modules importing fastgen_core/tangents.py, read from their sources (not from dvc.yaml)."""
    return {f.stem for f in (d / "fastgen_core/methods").glob("*.py")
            if re.search(r"^\s*from \.\.tangents import|^\s*from \.\. import .*\btangents\b", f.read_text(), re.M)}


@pytest.mark.parametrize("recipe", [p for p in PER_RECIPE if p.id in ("toy_scd", "toy_cd")])
def test_dvc_repro_after_touching_a_helper_reruns_exactly_its_users(recipe, tmp_path_factory, stage_forkserver):
    """Editing fastgen_core/tangents.py (a comment: the outputs stay bit-identical) reruns exactly
    the stages that train or sample with a method whose module imports it: all of sCD's stages that
    do, none of toy_cd's."""
    d, p, sh, _ = dvc_repo(recipe, tmp_path_factory, stage_forkserver)
    users = _tangent_users(d)
    assert users, "no method module imports tangents.py"
    r = load_recipe(p)
    expected = {f"{r.name}-{s}" for s in r.stages if {r.model_method(x) for x in [s, *r.upstream(s)]} & users}
    assert bool(expected) == (recipe.stem == "toy_scd")
    helper = d / "fastgen_core/tangents.py"
    original = helper.read_text()
    helper.write_text(original + "\n# touched by the test\n")
    try:
        ran = set(re.findall(r"Running stage '([^']+)'", sh("dvc", "repro")))
    finally:
        helper.write_text(original)
    assert ran == expected


# The papers' teacher sizes (EDM, Karras et al. 2022, Table 7): DDPM++ on CIFAR-10, ADM on ImageNet-64
PAPER_TEACHER_PARAMS = {"cifar10_consistency": 55.7e6, "cifar10_dmd2": 55.7e6, "cifar10_caf": 55.7e6, "imagenet64_dmd2": 295.9e6,
                        # score_sde DDPM++ (RF), Salimans & Ho's CIFAR U-Net (guided), pix2seq's TransUNet
                        # (bits; no middle blocks, ours has two: +9%), EDM DDPM++ (lowdiff), EDM ADM (msd)
                        "cifar10_reflow": 61.8e6, "cifar10_guided": 60.0e6, "cifar10_bits": 52.0e6,
                        "cifar10_lowdiff": 55.7e6, "imagenet64_msd": 295.9e6}


@pytest.mark.parametrize("recipe", [p for p in PER_RECIPE if paper_scale(p.values[0])])
def test_paper_scale_recipe_at_full_size(recipe, tmp_path):
    """As written (s3:// placeholder root, Ray with GPUs): validates, and its teacher U-Net has the
    paper's parameter count within 10%."""
    import torch

    from fastgen_core.nets import build_network

    r = load_recipe(recipe)
    assert r.compute.backend == "ray" and r.compute.use_gpu and r.data.root.startswith("s3://")
    teacher = next(s for s in r.stages.values() if getattr(s, "kind", None) == "teacher")
    side = r.data.resolution or 32
    with torch.device("meta"):
        net = build_network(teacher.network, (3, side, side), (10 if r.data.name == "cifar10" else 1000) * r.data.conditional)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / PAPER_TEACHER_PARAMS[recipe.stem] - 1) < 0.1, n
    # shrunk: every U-Net tiny, dropout kept, attention at the level it had if that level remains
    raw = yaml.safe_load(recipe.read_text())
    small = shrink(raw)
    nets = []

    def collect(node, orig):
        for k, v in node.items():
            if isinstance(v, dict):
                (nets.append((v, orig[k])) if k == "network" else collect(v, orig[k]))
    for name, spec in small["stages"].items():
        collect(spec, raw["stages"][name])
    assert nets and r.compute.num_workers > 1 and small["compute"] == {"backend": "local", "threads": 1}
    for n, orig in nets:
        assert n["width"] <= 16 and n["emb_dim"] <= 32 and n["depth"] == 1 and len(n["channel_mult"]) <= 2
        assert n.get("dropout") == orig.get("dropout")
    # attention at level 1 (16 px at 32 px, 32 px at 64 px): 8 px at the shrunk 16 px, for every paper-scale recipe
    assert all(n.get("attn_resolutions") == [8] for n, o in nets if o.get("attn_resolutions"))
    # bf16 autocast: kept in BF16_KEPT's DMD2 stage with its GAN head, fp32 in every other shrunk stage

    def precisions(node) -> list:
        return [w for k, v in node.items() if isinstance(v, dict)
                for w in ([(v.get("precision"), node)] if k == "train" else precisions(v))]
    shrunk = precisions(small["stages"])
    kept = ROOT / "params" / f"{BF16_KEPT}.yaml"
    assert paper_scale(kept) and kept.is_file()
    if recipe.stem == BF16_KEPT:
        assert any(p == "bf16" and (s.get("method") or {}).get("gan") for p, s in shrunk), shrunk
    else:
        assert "bf16" not in {p for p, _ in shrunk}
    p = tmp_path / recipe.name
    p.write_text(yaml.safe_dump(with_test_data(small, tmp_path / "data"), sort_keys=False))
    load_recipe(p)


def test_bench_study_recipe_shares_the_shipped_stages():
    """bench/toy_dmd_autoguided.yaml (a study recipe for bench/toy_dmd_seeds.py) validates, and its
    data, teacher and DMD2 student are params/toy_dmd.yaml's and its guide params/toy_ayf.yaml's, as
    docs/results.md compares them ("Toy DMD2: the autoguided real score")."""
    study = yaml.safe_load((ROOT / "bench/toy_dmd_autoguided.yaml").read_text())
    dmd = yaml.safe_load((ROOT / "params/toy_dmd.yaml").read_text())
    ayf = yaml.safe_load((ROOT / "params/toy_ayf.yaml").read_text())
    load_recipe(ROOT / "bench/toy_dmd_autoguided.yaml")
    assert (study["seed"], study["data"], study["noise"]) == (dmd["seed"], dmd["data"], dmd["noise"])
    assert study["stages"]["teacher"] == dmd["stages"]["teacher"] and study["stages"]["dmd2"] == dmd["stages"]["dmd2"]
    assert study["stages"]["guide"] == ayf["stages"]["guide"]
    ag = study["stages"]["dmd2_ag"]
    assert ag["train"] == dmd["stages"]["dmd2"]["train"]
    assert {k: v for k, v in ag["method"].items() if k not in ("guidance", "real_guidance")} == dmd["stages"]["dmd2"]["method"]
