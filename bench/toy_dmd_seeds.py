"""How often do the toy DMD / DMD2 students drop a mode? `toy_dmd` over many training seeds.

Issue 11's mode-coverage rows ("DMD without regression drops or unbalances modes where λ_reg = 0.25
covers all"; "DMD2 ratio 5 covers all 8 modes on every seed while ratio 1 is less stable") are
claims about draws: with three training seeds, which seed drops a mode moves with the CPU
(docs/results.md "toy_dmd as shipped, re-run on another machine"). This script counts them over N
seeds instead.

For each training seed s it writes a copy of the recipe with `seed: s` and its own storage root
(`WORK/seed<s>`), copies in one teacher and runs the named stages (`python -m stages.run`, one
process per stage, `--jobs` seeds at once; stages already done are reused by the runtime). The
teacher is trained once, at the recipe's own seed, and shared: the study varies the students'
seeds only, as docs/results.md's three-seed tables do. Each student is then evaluated with the
evaluate stage's protocol (n samples × eval seeds 0-2: z from seed 10000 + e, the global generator
at 20000 + e; `metrics.toy_metrics`), at 1 NFE unless `--nfe`.

Prints one row per seed (sliced W2 / off support / modes covered / mode recall) and, per stage, how
many seeds cover all 8 modes, how many collapse (off support > 0.5) and the mean, std and median of
each figure, and the teacher's figures at `--teacher-nfe`; writes JSON (default
bench/results/toy_dmd_seeds.json) and a strip plot next to it.

    python bench/toy_dmd_seeds.py --seeds 0-19 [--stages dmd dmd_noreg dmd2] [--work /tmp/toy_dmd_seeds]
                                  [--jobs 2] [--no-train] [--train KEY=VALUE ...] [--method KEY=VALUE ...]
                                  [--snapshots] [--masses]

`--train KEY=VALUE` sets a `train` setting of the named stages (VALUE read as YAML), e.g.
`--train ema_decay=0` (the evaluated weights are the trained ones, as DMD2's EDM code keeps no EMA of
its generator; the EMA does not change the training, so the study pairs with one at the recipe's EMA)
or `--train lr_warmup=0` (no warmup: `toy_dmd`'s DMD2 stages warm up over 500 iterations, as the code).
`--method KEY=VALUE` sets a `method` setting the same way, e.g. `--method gan_noised=true`. Validation
of the written recipes catches a bad key. `--snapshots` also evaluates each stage's snapshots, e.g. a
second, longer EMA of the same run: `--train 'snapshots=[3000]' snapshot_ema_decay=0.999 --snapshots`.
`--masses` also reports how the samples split between the modes (total variation to the true weights),
the spread within a mode, and sliced W2 with the samples redrawn in the true shares (`mass_figures`),
for real data too: it separates a wrong split between the modes from wrong modes. `--per-step` also
evaluates each multi-step student's output after every generator step j of its K-step rollout (the
outputs its fake critic is trained on, one j per iteration) and their even mixture (n/K of each):
DMD2's critic, and so the DM gradient, sees the mixture, not the last step alone. It draws the first
seed's steps and mixture next to the JSON (`<out>_<stage>_per_step.png`).

Cost (2-core Xeon at 2.80 GHz, two seeds at once): 6-9 min of wall time per pair of seeds for the three
default stages and their `pairs` (dmd ~3.5 min, dmd_noreg ~3 min, dmd2 ~2 min each); the 20-seed
study in docs/results.md took 75 min, its evaluation 1.5 min.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastgen_core import metrics as M  # noqa: E402
from fastgen_core.data import cached_data  # noqa: E402
from fastgen_core.methods.dmd import generator_sigmas  # noqa: E402
from fastgen_core.models import load_model, snapshot_dir  # noqa: E402
from fastgen_core.samplers import cm_multistep  # noqa: E402
from stages.evaluate import _generate  # noqa: E402  (the evaluate stage's own seeds and sampling)
from stages.recipe import RecipeError, load_recipe  # noqa: E402
from stages.runtime import stage_dir  # noqa: E402


def seed_list(text: str) -> list[int]:
    """'0-19' or '0,3,5' or '0-2,7'."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def key_value(text: str) -> tuple[str, object]:
    """`--train KEY=VALUE`: (KEY, VALUE read as YAML)."""
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, not {text!r}")
    return key, yaml.safe_load(value)


def seed_recipe(base: Path, work: Path, seed: int, settings: dict[str, dict[str, dict]] | None = None) -> Path:
    """The recipe with `seed: seed`, storage under WORK/seed<seed> and `settings[stage][section]`
    (section `train` or `method`) merged into those stages' settings; its YAML path."""
    doc = yaml.safe_load(base.read_text())
    doc["seed"] = seed
    for st, sections in (settings or {}).items():
        for section, values in sections.items():
            # a new dict: a YAML anchor shares one `train` mapping between stages
            doc["stages"][st][section] = {**doc["stages"][st].get(section, {}), **values}
    doc["storage"] = {**doc.get("storage", {}), "root": str(work / f"seed{seed}")}
    path = work / f"recipe_seed{seed}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_stage(recipe: Path, stage: str, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "stages.run", str(recipe), stage], cwd=ROOT, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{recipe}: stage {stage} failed (exit {rc}); see {log}")


def train_seed(recipe: Path, r, teacher: Path, stages: list[str], work: Path, seed: int) -> None:
    """The named stages and their upstream for one seed's recipe (`recipe` its path, `r` it loaded)."""
    dst = stage_dir(r, "teacher")
    if not dst.exists():
        shutil.copytree(teacher, dst)
    for st in [s for s in r.order(stages) if s != "teacher"]:  # the stages asked for and their upstream
        run_stage(recipe, st, work / f"seed{seed}.{st}.log")
        print(f"seed {seed}: {st} done", flush=True)


def stage_dirs(r, stages: list[str], snapshots: bool) -> dict[str, Path]:
    """Column name → model folder: each stage, and with `snapshots` its `train.snapshots` as
    STAGE@STEP (with `train.snapshot_ema_decay` if set)."""
    out = {}
    for st in stages:
        out[st] = stage_dir(r, st)
        for step in r.stages[st].train.snapshots if snapshots else []:
            out[f"{st}@{step}"] = snapshot_dir(out[st], step)
    return out


MASS_KEYS = ("mass_tv", "mode_spread", "swd_true_masses")


def mass_figures(x: torch.Tensor, data, n: int, seed: int) -> dict:
    """How the on-support samples `x` split between the modes, and what sliced W2 they would have
    with the true split. `mass_tv`: the total variation between the modes' sample shares and their
    true weights (1 − `metrics.mode_recall` of these samples). `mode_spread`: the per-axis std within
    a mode, averaged over modes (real data: 0.05 · 0.974 = 0.0487, a 2D Gaussian's std inside its
    3-std support). `swd_true_masses`: sliced W2 to the held-out set of n samples redrawn, with
    replacement, from each mode in its true share (generator `seed`)."""
    d, x = data.density, x.double()
    on, mode = d.on_support(x), d.mode_of(x)
    members = [(on & (mode == k)).nonzero()[:, 0] for k in range(d.num_modes)]
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(d.weights, n, replacement=True, generator=g).bincount(minlength=d.num_modes)
    picks = [idx[torch.randint(len(idx), (int(c),), generator=g)] for idx, c in zip(members, counts) if len(idx) and c]
    spreads = [x[idx].std(0).mean() for idx in members if len(idx) > 1]
    nan = float("nan")  # no sample on support (a collapsed student, or the teacher's own 1-step sample)
    return {"mass_tv": 1 - M.mode_recall(torch.tensor([len(idx) for idx in members]), d.weights),
            "mode_spread": float(torch.stack(spreads).mean()) if spreads else nan,
            "swd_true_masses": M.sliced_wasserstein(x[torch.cat(picks)], data.x_test) if picks else nan}


@torch.no_grad()
def step_outputs(model, n: int, e: int) -> list[torch.Tensor]:
    """A K-step DM student's outputs after each generator step j = 0 … K−1 of one rollout on its own
    levels (methods/dmd2.py `backward_simulate`, then G at step j), seeded as `_generate`: the last one
    is the student's K-NFE sample, bit for bit. One `cm_multistep` rollout, each G output recorded."""
    sigmas = generator_sigmas(model.noise, model.cfg.grid, model.cfg.steps).tolist()
    z = model.noise.draw(n, model.shape, torch.Generator().manual_seed(10_000 + e))
    G, outs = model.denoiser(), []

    def recorded(x, sigma, **cond):
        outs.append(G(x, sigma, **cond))
        return outs[-1]

    torch.manual_seed(20_000 + e)
    cm_multistep(recorded, z, sigmas, 0.0)
    return [x.float() for x in outs]


def per_step(path: Path, data, n: int) -> tuple[dict[str, dict], dict[str, torch.Tensor]] | None:
    """`evaluate`'s figures (masses included) of each generator step's outputs ("step0" …) and of
    their even mixture ("mixture": the first n/K samples of each step), mean over eval seeds 0-2;
    and eval seed 0's samples of each (for `plot_per_step`). None for a model with one step."""
    model = load_model(path, "cpu")
    K = model.meta["method_config"].get("steps", 1)
    if K == 1:
        return None
    acc: dict[str, dict[str, list[float]]] = {}
    panels = {}
    for e in range(3):
        small, big = step_outputs(model, n, e), step_outputs(model, 4 * n, e)
        assert torch.equal(small[-1], _generate(model, n, K, e, None, "cpu")), "not the student's own sampler"
        mix = lambda xs, m: torch.cat([x[j * m // K:(j + 1) * m // K] for j, x in enumerate(xs)])  # noqa: E731
        for name, x, x4 in [*((f"step{j}", a, b) for j, (a, b) in enumerate(zip(small, big))),
                            ("mixture", mix(small, n), mix(big, 4 * n))]:
            figures = {**M.toy_metrics(x, data.density, data.x_test), **mass_figures(x4, data, n, e)}
            for k, v in figures.items():
                acc.setdefault(name, {}).setdefault(k, []).append(v)
            if e == 0:
                panels[name] = x
    return {name: {k: sum(v) / len(v) for k, v in f.items()} for name, f in acc.items()}, panels


def plot_per_step(panels: dict[str, torch.Tensor], figures: dict[str, dict], data, title: str, path: Path) -> None:
    """One column per step and the mixture: the samples over the data (grey), whole (top) and around
    the first mode (bottom, ±5 of its per-axis std), titled with their mode spread and off-support share
    (means over the eval seeds; the samples drawn are eval seed 0's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    real = data.x_test.numpy()
    c, w = data.density.means[0].numpy(), 5 * float(data.density.stds[0].max())
    lim = float(abs(real).max() * 1.25)
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.4), squeeze=False)
    for j, (name, x) in enumerate(panels.items()):
        x = x.numpy()
        for ax, (lo, hi) in zip(axes[:, j], [((-lim, -lim), (lim, lim)), (c - w, c + w)]):
            ax.scatter(real[:, 0], real[:, 1], s=1, c="0.75", rasterized=True)
            ax.scatter(x[:, 0], x[:, 1], s=1, c="C0", alpha=0.5, rasterized=True)
            ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xticks=[], yticks=[], aspect="equal")
        axes[0, j].set_title(f"{name}\nspread {figures[name]['mode_spread']:.3f}, off {figures[name]['off_support']:.2f}",
                             fontsize=9)
    spread = mass_figures(data.x_test, data, len(real), 0)["mode_spread"]
    fig.suptitle(f"{title} (grey: held-out data, spread {spread:.3f}); bottom: around one mode", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_per_step(stage: str, rows: dict[int, dict[str, dict]]) -> None:
    """`per_step`'s figures of one stage: a row per seed, a column per step and the mixture, and the means."""
    keys = ("swd", "off_support", "mode_spread", "mass_tv")
    names = list(next(iter(rows.values())))
    print(f"{stage} per generator step: | seed | " + " | ".join(names) + " |  (sliced W2 / off support / mode spread / mass TV)")
    for s, f in rows.items():
        print(f"| {s} | " + " | ".join(" / ".join(f"{f[x][k]:.4f}" for k in keys) for x in names) + " |")
    print("| mean | " + " | ".join(" / ".join(f"{statistics.mean(f[x][k] for f in rows.values()):.4f}" for k in keys)
                                   for x in names) + " |", flush=True)


def evaluate(path: Path | None, data, n: int, nfe: int, masses: bool = False) -> dict:
    """The evaluate stage's toy protocol: mean over eval seeds 0-2. With `masses`, also
    `mass_figures` of 4n samples drawn the same way; `path` None: real data (draws of the true
    density) instead of a model."""
    model = load_model(path, "cpu") if path is not None else None

    def draw(size: int, e: int) -> torch.Tensor:
        with torch.no_grad():
            return (_generate(model, size, nfe, e, None, "cpu") if model is not None
                    else data.density.sample(size, torch.Generator().manual_seed(30_000 + e))[0])

    acc: dict[str, list[float]] = {}
    for e in range(3):
        figures = M.toy_metrics(draw(n, e), data.density, data.x_test)
        if masses:
            figures.update(mass_figures(draw(4 * n, e), data, n, e))
        for k, v in figures.items():
            acc.setdefault(k, []).append(v)
    out = {k: sum(v) / len(v) for k, v in acc.items()}
    out["modes"] = round(out["mode_coverage"] * data.density.num_modes)
    return out


def summary(rows: dict, stage: str, k: int) -> dict:
    fig = [rows[s][stage] for s in rows if stage in rows[s]]
    if not fig:
        return {}
    def stats(v: list[float]) -> dict:  # NaN (`mass_figures` of a student with no sample on support) left out
        v = [x for x in v if x == x] or [float("nan")]
        return {"mean": statistics.mean(v), "median": statistics.median(v),
                "std": statistics.stdev(v) if len(v) > 1 else 0.0}
    stat = {key: stats([f[key] for f in fig]) for key in ("swd", "off_support", "mode_recall", "nll", *MASS_KEYS)
            if key in fig[0]}
    return {"n": len(fig), "all_modes": sum(f["modes"] == k for f in fig),
            "collapsed": sum(f["off_support"] > 0.5 for f in fig), **stat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "params" / "toy_dmd.yaml"))
    ap.add_argument("--seeds", default="0-9", help="training seeds: 0-19, 0,3,5 or 0-2,7")
    ap.add_argument("--stages", nargs="+", default=["dmd", "dmd_noreg", "dmd2"])
    ap.add_argument("--work", default="/tmp/toy_dmd_seeds")
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once")
    ap.add_argument("--no-train", action="store_true", help="evaluate what WORK already holds")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--nfe", type=int, default=1)
    ap.add_argument("--train", nargs="+", default=[], type=key_value, metavar="KEY=VALUE",
                    help="train settings of the named stages, e.g. ema_decay=0 lr_warmup=0")
    ap.add_argument("--method", nargs="+", default=[], type=key_value, metavar="KEY=VALUE",
                    help="method settings of the named stages, e.g. gan_noised=true")
    ap.add_argument("--snapshots", action="store_true",
                    help="also evaluate each stage's snapshots (train.snapshots; columns STAGE@STEP)")
    ap.add_argument("--teacher-nfe", type=int, default=35, help="the teacher's NFE (a line in the plot)")
    ap.add_argument("--masses", action="store_true",
                    help="also the modes' masses and spread, and sliced W2 with the true masses (real data too)")
    ap.add_argument("--per-step", action="store_true",
                    help="also each multi-step student's outputs after every generator step, and their mixture")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "toy_dmd_seeds.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    base, work, seeds = Path(a.recipe).resolve(), Path(a.work).resolve(), seed_list(a.seeds)
    work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(base)
    overrides = {"train": dict(a.train), "method": dict(a.method)}
    recipes = {s: seed_recipe(base, work, s, {st: overrides for st in a.stages}) for s in seeds}
    try:  # a bad setting: one line naming the file and field, before any training
        loaded = {s: load_recipe(path) for s, path in recipes.items()}
    except RecipeError as e:
        raise SystemExit(str(e)) from None
    home = recipes.get(recipe.seed) or seed_recipe(base, work, recipe.seed)  # the teacher's own seed
    teacher = stage_dir(loaded[recipe.seed] if recipe.seed in loaded else load_recipe(home), "teacher")
    if not a.no_train:
        if not teacher.exists():
            run_stage(home, "teacher", work / "teacher.log")
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda s: train_seed(recipes[s], loaded[s], teacher, a.stages, work, s), seeds))

    data = cached_data(recipe.data)
    k = data.density.num_modes
    ref = evaluate(teacher, data, a.n, a.teacher_nfe, a.masses)
    print(f"teacher at {a.teacher_nfe} NFE: sliced W2 {ref['swd']:.4f}, off support {ref['off_support']:.3f}, "
          f"{ref['modes']} modes, mode recall {ref['mode_recall']:.3f}")
    real = evaluate(None, data, a.n, 0, True) if a.masses else None
    for name, f in (("teacher", ref), ("real data", real)) if a.masses else ():
        print(f"{name}: mass TV {f['mass_tv']:.3f}, mode spread {f['mode_spread']:.4f}, "
              f"sliced W2 with the true masses {f['swd_true_masses']:.4f}")
    rows: dict[int, dict] = {}
    dirs = {s: stage_dirs(loaded[s], a.stages, a.snapshots) for s in seeds}
    columns = list(dirs[seeds[0]])  # every seed's recipe has the same stages and snapshots
    print("| seed | " + " | ".join(columns) + " |  (sliced W2 / off support / modes / mode recall)")
    for s in seeds:
        rows[s] = {st: evaluate(d, data, a.n, a.nfe, a.masses) for st, d in dirs[s].items() if d.exists()}
        cells = [f"{f['swd']:.4f} / {f['off_support']:.3f} / {f['modes']} / {f['mode_recall']:.3f}" if (f := rows[s].get(st))
                 else "" for st in columns]
        print(f"| {s} | " + " | ".join(cells) + " |", flush=True)
    steps = {}
    for st in columns if a.per_step else ():  # multi-step students only
        done = {s: r for s in seeds if dirs[s][st].exists() and (r := per_step(dirs[s][st], data, a.n))}
        if not done:
            continue
        steps[st] = {s: f for s, (f, _) in done.items()}
        first = next(iter(done))
        plot_per_step(done[first][1], done[first][0], data, f"{st}, training seed {first}, eval seed 0",
                      Path(a.out).with_name(f"{Path(a.out).stem}_{st.replace('@', '_')}_per_step.png"))
        print_per_step(st, steps[st])
    summ = {st: summary(rows, st, k) for st in columns}
    extra = MASS_KEYS if a.masses else ()
    for st, m in summ.items():
        if m:
            print(f"{st}: all {k} modes on {m['all_modes']}/{m['n']} seeds, collapsed {m['collapsed']}; "
                  + "; ".join(f"{key} {m[key]['mean']:.4f} ± {m[key]['std']:.4f} (median {m[key]['median']:.4f})"
                              for key in ("swd", "off_support", "mode_recall", *extra)))
    out = {"recipe": str(base), "train": overrides["train"], "method": overrides["method"], "seeds": seeds, "nfe": a.nfe, "n": a.n, "teacher": {"nfe": a.teacher_nfe, **ref}, "real": real,
           "per_seed": rows, "summary": summ, "per_step": steps}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    plot(rows, ref, columns, k, Path(a.out).with_suffix(".png"))
    print(f"wrote {a.out}")


def plot(rows: dict, ref: dict, stages: list[str], k: int, path: Path) -> None:
    """Mode recall, sliced W2 and off support per seed, one column per stage; dropped-mode seeds in
    red; the teacher dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, label in zip(axes, ("mode_recall", "swd", "off_support"), ("mode recall", "sliced W2", "off support")):
        ax.axhline(ref[key], ls="--", c="gray", lw=1, label="teacher")
        for i, st in enumerate(stages):
            pts = [(rows[s][st][key], rows[s][st]["modes"] < k) for s in rows if st in rows[s]]
            xs = [i + 0.3 * (j / max(len(pts) - 1, 1) - 0.5) for j in range(len(pts))]
            ax.scatter(xs, [p for p, _ in pts], c=["tab:red" if d else "tab:blue" for _, d in pts], s=14)
        ax.set_xticks(range(len(stages)), stages)
        ax.set_ylabel(label)
        if key != "mode_recall":
            ax.set_yscale("log")
    axes[0].set_title(f"blue: all {k} modes, red: a mode dropped", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
