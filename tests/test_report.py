"""`fastgen report RECIPE` (stages/report.py) on a real evaluation of a small 2D recipe.

The markdown and the HTML page are written next to the evaluation's folder. The HTML page is
self-contained: its table has one row per model × NFE with the mean and std that metrics.json holds
(read here with the standard library's HTML parser, not the report's code), and every plot of the
evaluation is embedded byte for byte as a data: URI; nothing in it points outside the file. The
markdown's plot links resolve from the markdown's own folder.
"""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

RECIPE = {
    "name": "tiny_report",
    "seed": 0,
    "data": {"kind": "toy", "name": "8gaussians", "n_train": 1000, "n_test": 300},
    "stages": {
        "teacher": {"kind": "teacher", "method": {"name": "edm"},
                    "network": {"arch": "mlp", "width": 32, "depth": 2, "emb_dim": 16},
                    "train": {"steps": 60, "batch_size": 64, "log_every": 20}},
        "eval": {"kind": "evaluate", "inputs": {"models": ["teacher"]},
                 "evaluate": {"n_samples": 128, "seeds": [0, 1], "teacher_nfe": [1, 5], "plots": True}},
    },
    "tracking": {"enabled": False},
    "compute": {"threads": 1},
}


class Page(HTMLParser):
    """The table cells (row by row) and every src/href of an HTML page."""

    def __init__(self):
        super().__init__()
        self.rows, self.refs, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href")]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from stages.recipe import load_recipe
    from stages.runtime import run_stage, stage_dir

    d = tmp_path_factory.mktemp("report")
    path = d / "tiny_report.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "storage": {"root": str(d / "outputs")}}, sort_keys=False))
    for s in ("teacher", "eval"):
        run_stage(str(path), s)
    return str(path), stage_dir(load_recipe(str(path)), "eval")


def test_report_writes_a_self_contained_html_page_next_to_the_markdown(evaluated, capsys):
    from stages.report import main

    path, out = evaluated
    assert main([path, "--summary", str(out.parent / "summary.json")]) == 0
    printed = capsys.readouterr().out
    md, page = out.parent / "eval.report.md", out.parent / "eval.report.html"
    assert str(md) in printed and str(page) in printed

    results = json.loads((out / "metrics.json").read_text())
    p = Page()
    p.feed(page.read_text(encoding="utf-8"))
    head, body = p.rows[0], p.rows[1:]
    assert head[:3] == ["model", "NFE", "swd (mean ± std)"]
    assert sorted((r[0], int(r[1])) for r in body) == [("teacher", 1), ("teacher", 5)]
    for r in body:  # the numbers are those of metrics.json
        s = results[r[0]][f"nfe_{r[1]}"]["swd"]
        assert r[2] == f"{s['mean']:.4g} ± {s['std']:.2g}" and r[3] == f"{s['floor_mean']:.4g}"

    # every plot of the evaluation, embedded as it is on disk; no reference leaves the file
    plots = sorted((out / "plots").glob("*.png"))
    assert {"quality_vs_nfe.png", "samples.png"} <= {f.name for f in plots}
    assert all(ref.startswith("data:image/png;base64,") for ref in p.refs) and len(p.refs) == len(plots)
    embedded = [base64.b64decode(ref.split(",", 1)[1]) for ref in p.refs]
    assert sorted(embedded) == sorted(f.read_bytes() for f in plots)
    assert embedded[0] == (out / "plots/quality_vs_nfe.png").read_bytes()  # the headline plot first

    # the markdown: the same rows, and plot links that resolve from its own folder
    text = md.read_text()
    assert sum(line.startswith("| teacher |") for line in text.splitlines()) == 2
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((md.parent / link).is_file() for link in links), links


def test_report_of_a_recipe_not_run_yet_writes_nothing(tmp_path, capsys):
    from stages.report import main

    path = tmp_path / "tiny_report.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "storage": {"root": str(tmp_path / "outputs")}}, sort_keys=False))
    assert main([str(path)]) == 1
    assert "not evaluated yet" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.report.*"))
