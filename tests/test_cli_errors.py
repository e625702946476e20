"""The `fastgen` command line on misuse: one line naming what is wrong, a non-zero exit, nothing
left behind, and never a hang. Each case fails before any training (the project's standard:
"bad input gets a clear error, and nothing is lost")."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stages import cli


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty working folder; MLflow and the cache point into it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTGEN_TRACEBACK", raising=False)
    return tmp_path


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_an_output_folder_that_cannot_be_made_is_one_line_not_a_hang(here, capsys):
    # /proc refuses new folders: the stage lock's folder cannot be made (this used to retry forever)
    assert cli.main(["run", "toy_cd", "-S", "storage.root=/proc/fastgen-nope"]) == 2
    assert "cannot create /proc/fastgen-nope/toy_cd/.partial" in one_line(capsys)
    (here / "file").write_text("x")
    assert cli.main(["run", "toy_cd", "-S", f"storage.root={here / 'file' / 'x'}"]) == 2
    assert "Not a directory" in one_line(capsys)


def test_stage_and_flow_take_a_recipe_name_wherever_it_stands(here, capsys):
    # `stage` resolves the name as `run` does (it used to pass `toy_cd` on as a file name)
    assert cli.main(["stage", "toy_cd", "nosuch"]) == 2
    assert "no stage named 'nosuch'" in one_line(capsys)
    # an option's value is not taken for the recipe
    assert cli.main(["flow", "-S", "seed=3", "nosuch_recipe"]) == 2
    line = one_line(capsys)
    assert line.startswith("nosuch_recipe: <file>: no such recipe file"), line


def test_verify_and_lineage_on_a_broken_manifest(here, capsys):
    art = here / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{bad")
    assert cli.main(["verify", str(art)]) == 1
    assert f"MISMATCH {art}: manifest.json is not valid JSON" in capsys.readouterr().out
    (art / "manifest.json").write_text(json.dumps({"stage": "x"}))
    assert cli.main(["lineage", str(art)]) == 2
    assert "manifest.json is not a fastgen manifest" in one_line(capsys)
    assert cli.main(["verify", "params/nonexistent.yaml"]) == 2
    assert one_line(capsys) == "params/nonexistent.yaml: <file>: no such recipe file"


def test_an_object_store_without_credentials_is_one_line_naming_it(here, capsys, monkeypatch):
    # no S3 credentials: one line naming the artifact and what to set, nothing left in the cache
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(here / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(here / "none"))
    s3fs.S3FileSystem.clear_instance_cache()  # one made with the S3 test server's keys would answer
    try:
        assert cli.main(["run", "toy_cd", "-S", "storage.root=s3://nobucket/x"]) == 2
        line = one_line(capsys)
        assert line.startswith("error: s3://nobucket/x/toy_cd/teacher: no AWS credentials found"), line
        assert "AWS_ACCESS_KEY_ID" in line
        # the stage command of `dvc repro` says the same
        (here / "r.yaml").write_text((Path(cli.__file__).parents[1] / "params/toy_cd.yaml").read_text()
                                     + "\nstorage:\n  root: s3://nobucket/x\n")
        assert cli.main(["stage", "r.yaml", "teacher"]) == 2
        assert "s3://nobucket/x/toy_cd/teacher: no AWS credentials found" in one_line(capsys)
        for cmd in ("verify", "lineage"):  # read from the bucket alone
            assert cli.main([cmd, "s3://nobucket/x/toy_cd/teacher"]) == 2
            assert one_line(capsys).startswith(f"fastgen {cmd}: s3://nobucket/x/toy_cd/teacher: no AWS credentials")
        assert [p.name for p in (here / "cache").iterdir()] == [], "left in the cache"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor may this one answer later tests


def test_an_unexpected_error_is_one_line(here, capsys, monkeypatch):
    # an error the stages do not expect: its type and first line (FASTGEN_TRACEBACK=1 raises it)
    from stages import runtime

    def broken(recipe, stage, force=False):
        raise RuntimeError("the first line\nand a second line")

    monkeypatch.setattr(runtime, "run_stage", broken)
    assert cli.main(["stage", "toy_cd", "teacher"]) == 1
    line = one_line(capsys)
    assert line == "fastgen stage: RuntimeError: the first line (FASTGEN_TRACEBACK=1 shows where)", line
    monkeypatch.setenv("FASTGEN_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="the first line"):
        cli.main(["stage", "toy_cd", "teacher"])


def test_sweep_settings_that_could_never_finish(here, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never contacted: refused before
    assert cli.main(["sweep", "toy_cd", "-S", "seed=1,2", "--max-parallel", "0"]) == 2
    assert "--max-parallel 0" in one_line(capsys)
    assert cli.main(["sweep", "nosuch", "-S", "seed=1,2"]) == 2  # said once, not once per trial
    assert "'nosuch' is not a recipe in params/" in one_line(capsys)


def test_edit_refuses_a_folder_as_output_and_writes_nothing(here, capsys):
    (here / "out").mkdir()
    rc = cli.main(["edit", "--model", str(here / "m"), "--task", "inpaint", "--from-test", "2",
                   "--out", str(here / "out")])
    assert rc == 2 and "--out" in one_line(capsys)
    assert cli.main(["edit", "--model", str(here / "m"), "--task", "inpaint", "--from-test", "-2",
                     "--out", str(here / "o.npz")]) == 2
    assert "--from-test: must be a positive number" in one_line(capsys)
    assert sorted(os.listdir(here)) == ["out"]


def test_shapes_checks_its_seed_before_making_folders(here, capsys):
    assert cli.main(["shapes", str(here / "deep" / "a" / "sh"), "--seed", "-1"]) == 2
    assert "seed" in one_line(capsys)
    assert not (here / "deep").exists()


def test_report_of_a_folder_with_no_evaluated_trial_fails(here, capsys):
    (here / "sweep").mkdir()
    assert cli.main(["report", str(here / "sweep")]) == 1
    assert "no evaluated trial yet" in capsys.readouterr().out
