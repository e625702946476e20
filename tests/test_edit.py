"""Zero-shot editing as a stage and a CLI (stages/edit.py), on the coloured digits (data.color).

The shipped recipe params/digits_edit.yaml, scaled down (tiny networks, a few steps), runs stage by
stage (as `dvc repro` does; tests/test_recipes.py runs it through `dvc repro` and the flow). Editing
keeps the known pixels / patch means / luminance to float precision for any f, so an almost
untrained model is enough to check it.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from fastgen_core import editing as E
from fastgen_core.config import DataConfig
from fastgen_core.data import color_digits, load_data
from stages.recipe import RecipeError, load_recipe, parse_recipe
from conftest import run_stagewise
from stages.runtime import stage_dir

ROOT = Path(__file__).resolve().parent.parent
EDITS = ("inpaint", "superres", "colorize")
FLOAT_PRECISION = 1e-6


def tiny_edit_recipe(root: Path, storage: str | None = None, mlflow_template: Path | None = None,
                     tracking: bool = True) -> Path:
    """params/digits_edit.yaml with tiny networks, a few training steps and 16 edited images."""
    raw = yaml.safe_load((ROOT / "params/digits_edit.yaml").read_text())
    for st in raw["stages"].values():
        if "network" in st:
            st["network"] = {"arch": "mlp", "width": 32, "depth": 1, "emb_dim": 16}
        if "train" in st:
            st["train"] = {"steps": 10, "batch_size": 64, "log_every": 5, "ckpt_every": 100}
        if "edit" in st:
            st["edit"].update(n_images=16, steps=2)
    raw["storage"] = {"root": storage or str(root / "outputs")}
    raw["tracking"] = {"uri": f"sqlite:///{root / 'mlflow.db'}", "enabled": tracking}
    if mlflow_template is not None:
        shutil.copy(mlflow_template, root / "mlflow.db")
    path = root / "params" / "digits_edit.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stagewise(tmp_path_factory, mlflow_template):

    path = tiny_edit_recipe(tmp_path_factory.mktemp("edit_stagewise"), mlflow_template=mlflow_template)
    recipe = load_recipe(path)
    manifests, _ = run_stagewise(recipe, "edit")
    return SimpleNamespace(path=path, recipe=recipe, manifests=manifests)


def _load(recipe, stage):
    d = stage_dir(recipe, stage)
    with np.load(d / "edited.npz") as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    return arrays, json.loads((d / "metrics.json").read_text())

#----------------------------------------------------------------------------
# Coloured digits.


def test_colored_digits_keep_the_shape_and_leave_colour_open():
    rgb, grey = load_data(DataConfig(kind="digits", color=True)), load_data(DataConfig(kind="digits"))
    assert rgb.x.shape == (1400, 3, 8, 8) and rgb.x_test.shape == (397, 3, 8, 8)
    assert rgb.x.min() >= -1 and rgb.x.max() <= 1 and torch.equal(rgb.y, grey.y)
    # each image is its grey digit's ink times one colour of brightness in [0.5, 1]
    ink, col = (grey.x + 1) / 2, (rgb.x + 1) / 2
    lit = ink > 0.05
    ratio = col.amax(1, keepdim=True)[lit] / ink[lit]
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 1 + 1e-5
    # the luminance does not determine the colour: pixels of (nearly) equal luminance, far apart in RGB
    px = rgb.x.permute(0, 2, 3, 1).reshape(-1, 3)
    px = px[E.luminance(rgb.x).flatten() > -0.9]
    L = (px * torch.tensor(E.LUMINANCE)).sum(1)
    order = L.argsort()
    a, b = px[order[:-1]], px[order[1:]]
    close = (L[order[1:]] - L[order[:-1]]).abs() < 0.01
    assert ((a - b).norm(dim=1)[close] > 0.5).sum() > 100
    # deterministic by seed
    again = load_data(DataConfig(kind="digits", color=True))
    assert torch.equal(rgb.x, again.x)
    ones = torch.ones(50, 1, 2, 2)
    assert torch.equal(color_digits(ones, 0), color_digits(ones, 0))
    assert not torch.equal(color_digits(ones, 0), color_digits(ones, 1))


def test_color_is_for_digits_only_and_colorize_needs_rgb():
    with pytest.raises(ValueError, match="color applies to kind 'digits' only"):
        DataConfig(kind="toy", color=True)
    raw = yaml.safe_load((ROOT / "params/digits_edit.yaml").read_text())
    raw["data"]["color"] = False
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml")
    assert e.value.problems == ["r.yaml: stages.colorize.edit.task: colorize needs RGB data (e.g. data.color: true for digits)"]
    raw = yaml.safe_load((ROOT / "params/digits_edit.yaml").read_text())
    raw["stages"]["inpaint"]["inputs"] = {"model": "teacher"}
    raw["stages"]["superres"]["inputs"] = {}
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml")
    assert len(e.value.problems) == 2
    assert e.value.problems[0].startswith("r.yaml: stages.inpaint.inputs.model: stage 'teacher' (teacher, method 'edm') is not")
    assert e.value.problems[1] == "r.yaml: stages.superres.inputs.model: an edit stage needs one model stage as input `model`"
    raw = yaml.safe_load((ROOT / "params/digits_edit.yaml").read_text())
    raw["data"] = {"kind": "toy"}
    raw["stages"]["teacher"]["network"] = {"arch": "mlp"}  # the recipe's conv teacher needs images too
    del raw["stages"]["colorize"], raw["stages"]["superres"]
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml")
    assert e.value.problems == ["r.yaml: stages.inpaint.kind: editing needs image data (data.kind digits or images), not toy"]

#----------------------------------------------------------------------------
# Metrics, by hand.


def test_metrics_by_hand():
    truth = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    x = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])                 # left column known
    t = E.make_task("inpaint", truth, mask)
    assert torch.equal(t.baseline, torch.tensor([[[[1.0, 1.0], [0.5, 0.5]]]]))   # nearest known pixel
    m = E.edit_metrics(t, x, truth)
    assert m["edited"]["mse_unknown"] == pytest.approx(1.0) and m["edited"]["mse_all"] == pytest.approx(0.5)
    assert m["edited"]["psnr_all"] == pytest.approx(10 * math.log10(4 / 0.5))
    assert m["baseline"]["mse_unknown"] == pytest.approx((4 + 0.25) / 2) and m["known_max_abs_change"] == 0
    m = E.edit_metrics(t, x, truth, mean=x + 0.5)                      # the mean moved the known pixels by 0.5
    assert m["edited_mean"]["mse_all"] == pytest.approx((0.25 + 2.25 + 0.25 + 2.25) / 4) and m["known_max_abs_change"] == 0.5
    # super-resolution ×2: the known coordinate is the patch mean, the other 3 are unknown
    t = E.make_task("superres", truth, k=2)
    assert torch.allclose(t.baseline, torch.full_like(truth, 0.125))
    sse = 0.875**2 + 1.125**2 + 0.375**2 + 0.125**2
    m = E.edit_metrics(t, t.baseline, truth)
    assert m["edited"]["mse_unknown"] == pytest.approx(sse / 3) and m["edited"]["mse_all"] == pytest.approx(sse / 4)
    # colorization of a red pixel: the baseline is grey with the same luminance
    red = torch.tensor([1.0, -1.0, -1.0]).reshape(1, 3, 1, 1)
    t = E.make_task("colorize", red)
    g = (0.2989 - 0.5870 - 0.1140) / 0.9999
    assert torch.allclose(t.baseline, torch.full_like(red, g))
    m = E.edit_metrics(t, t.baseline, red)
    assert m["baseline"]["mse_all"] == pytest.approx(((1 - g) ** 2 + 2 * (1 + g) ** 2) / 3, rel=1e-6)
    assert m["baseline"]["mse_unknown"] == pytest.approx(((1 - g) ** 2 + 2 * (1 + g) ** 2) / 2, rel=1e-5)
    assert m["saturation"] == pytest.approx({"truth": 1.0, "edited": 0.0, "baseline": 0.0})
    assert m["known_max_abs_change"] < 1e-6

#----------------------------------------------------------------------------
# The stage.


def test_edit_stages_keep_the_known_part_and_score_against_the_truth(stagewise):
    recipe = stagewise.recipe
    kept = {"inpaint": lambda x, a: x[a["mask"].expand_as(x).bool()], "superres": lambda x, a: E.patch_means(x, 2),
            "colorize": lambda x, a: E.luminance(x)}
    for s in EDITS:
        a, m = _load(recipe, s)
        assert set(m) >= {"edited", "baseline", "known_max_abs_change", "baseline_name"}
        assert a["edited"].shape == a["truth"].shape == (16, 3, 8, 8)
        assert a["edited_mean"].shape == a["truth"].shape and m["samples"] == 8 and "edited_mean" in m
        change = max(float((kept[s](a[k], a) - kept[s](a["truth"], a)).abs().max()) for k in ("edited", "edited_mean"))
        assert change <= FLOAT_PRECISION and change == pytest.approx(m["known_max_abs_change"], abs=1e-12), s
        # the unknown part was filled in: the edit is not the observation
        assert (a["edited"] - a["observed"]).abs().max() > 0.1, s
        mse_all = float(((a["edited"].double() - a["truth"].double()) ** 2).mean())
        assert m["edited"]["mse_all"] == pytest.approx(mse_all, rel=1e-9), s
        if s == "inpaint":
            unknown = ~a["mask"].expand_as(a["truth"]).bool()
            mse = float(((a["edited"].double() - a["truth"].double())[unknown] ** 2).mean())
            assert m["edited"]["mse_unknown"] == pytest.approx(mse, rel=1e-9)
            assert (a["mask"][..., :4] == 0).all() and (a["mask"][..., 4:] == 1).all()   # left_half
        assert (stage_dir(recipe, s) / "plots" / "edit.png").stat().st_size > 1000
        # manifest and MLflow run, as for every stage
        man = stagewise.manifests[s]
        assert man["kind"] == "edit" and set(man["inputs"]) == {"cd"}
        assert man["metrics"]["known_max_abs_change"] == m["known_max_abs_change"]
        from mlflow import MlflowClient

        run = MlflowClient(recipe.tracking.uri).get_run(man["mlflow"]["run_id"])
        assert run.data.metrics["edited.mse_unknown"] == pytest.approx(m["edited"]["mse_unknown"])
        assert run.data.tags["fastgen.kind"] == "edit"


#----------------------------------------------------------------------------
# The CLI.


def test_cli_is_the_stage_outside_a_recipe(stagewise, tmp_path, capsys):
    from stages.cli import main

    cd = stage_dir(stagewise.recipe, "cd")
    out = tmp_path / "out.npz"
    rc = main(["edit", "--model", str(cd), "--task", "colorize", "--from-test", "16", "--steps", "2", "--samples", "8",
               "--out", str(out), "--metrics", str(tmp_path / "m.json")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    stage_arrays, stage_metrics = _load(stagewise.recipe, "colorize")
    with np.load(out) as z:
        assert set(z.files) == set(stage_arrays)
        for k in z.files:
            assert np.array_equal(z[k], stage_arrays[k].numpy()), k
    assert printed == {k: v for k, v in stage_metrics.items()} == json.loads((tmp_path / "m.json").read_text())
    # a random mask on images given in a file: known pixels kept
    np.savez(tmp_path / "imgs.npz", images=stage_arrays["truth"].numpy()[:4])
    assert main(["edit", "--model", str(cd), "--task", "inpaint", "--mask", "random", "--fraction", "0.3",
                 "--images", str(tmp_path / "imgs.npz"), "--out", str(tmp_path / "r.npz")]) == 0
    with np.load(tmp_path / "r.npz") as z:
        known = np.broadcast_to(z["mask"], z["truth"].shape).astype(bool)
        assert np.array_equal(z["edited"][known], z["truth"][known]) and 0 < (~known).mean() < 0.6


@pytest.mark.parametrize("case", ["no_model", "not_consistency", "shape", "task", "k", "no_source", "bad_file"])
def test_cli_bad_input_one_line_nonzero_nothing_written(case, stagewise, tmp_path, capsys):
    from stages.cli import main

    cd, teacher = stage_dir(stagewise.recipe, "cd"), stage_dir(stagewise.recipe, "teacher")
    np.savez(tmp_path / "grey.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    (tmp_path / "junk.npz").write_text("not a zip")
    out = tmp_path / "out.npz"
    args = {"no_model": ["--model", str(tmp_path / "nope"), "--task", "inpaint", "--from-test", "2"],
            "not_consistency": ["--model", str(teacher), "--task", "inpaint", "--from-test", "2"],
            "shape": ["--model", str(cd), "--task", "inpaint", "--images", str(tmp_path / "grey.npz")],
            "task": ["--model", str(cd), "--task", "deblur", "--from-test", "2"],
            "k": ["--model", str(cd), "--task", "superres", "--k", "3", "--from-test", "2"],
            "no_source": ["--model", str(cd), "--task", "inpaint"],
            "bad_file": ["--model", str(cd), "--task", "inpaint", "--images", str(tmp_path / "junk.npz")]}[case]
    expect = {"no_model": "not a model folder", "not_consistency": "method 'edm' has no consistency_fn",
              "shape": "images of shape (1, 8, 8) but the model makes (3, 8, 8)", "task": "--task: Input should be",
              "k": "k=3 does not divide", "no_source": "one of the arguments --images --from-test is required",
              "bad_file": "cannot read as .npz"}[case]
    capsys.readouterr()
    rc = main(["edit", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("fastgen edit: error:") and expect in err, err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))

#----------------------------------------------------------------------------
# `dvc repro` and the Prefect flow run params/digits_edit.yaml (shrunk) in tests/test_recipes.py,
# with outputs identical between the two; here: what dvc.yaml declares for an edit stage.


def test_dvc_yaml_tracks_edit_stages_whole_with_their_code():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert dvc["digits_edit-colorize"]["outs"] == ["outputs/digits_edit/colorize"]
    assert "fastgen_core/editing.py" in dvc["digits_edit-inpaint"]["deps"]
    assert "fastgen_core/methods/cd.py" in dvc["digits_edit-inpaint"]["deps"]
