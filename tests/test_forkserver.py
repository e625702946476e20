"""The tests' warm interpreter for `dvc repro`'s stage commands (tests/forkserver.py) behaves as a
fresh `python -m stages.run` (or `-m stages.dvcgen`): same output streams, same exit status, the
project's code read from the command's own PYTHONPATH; any other `python` command goes to the real
interpreter. (That its stages' outputs equal the flow's, bit for bit, is tests/test_recipes.py's DVC
check.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_stage_command_through_the_forkserver_is_a_fresh_process(stage_forkserver, tmp_path):
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base.pop("FASTGEN_INVOCATION", None)
    plain = {**base, "PATH": f"{Path(sys.executable).parent}:{base['PATH']}"}
    forked = stage_forkserver(plain)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages: {}\nnoise: {sigma_max: -1}\n")
    for cmd in (["python", "-m", "stages.run", str(bad), "teacher"],  # a recipe that fails validation
                ["python", "-m", "stages.run", str(ROOT / "params/toy_cd.yaml"), "nope"],  # no such stage
                ["python", "-m", "stages.dvcgen", "--no-such-option"],  # dvc.yaml's generator: a usage error
                ["python", "-c", "import sys; print(sys.argv); sys.exit(3)", "x"]):  # not a stage: the real one
        want = subprocess.run(cmd, env=plain, cwd=tmp_path, capture_output=True, text=True)
        got = subprocess.run(cmd, env=forked, cwd=tmp_path, capture_output=True, text=True)
        assert want.returncode != 0 and (got.returncode, got.stdout, got.stderr) == \
            (want.returncode, want.stdout, want.stderr), (cmd, want, got)
    # the project's code comes from the command's PYTHONPATH, not from the server
    alt = tmp_path / "alt"
    (alt / "stages").mkdir(parents=True)
    (alt / "stages/__init__.py").write_text("")
    (alt / "stages/run.py").write_text("import os, sys\nprint(__file__, os.getcwd(), sys.argv[1:])\nsys.exit(5)\n")
    got = subprocess.run(["python", "-m", "stages.run", "a", "b"], env={**forked, "PYTHONPATH": str(alt)},
                         cwd=tmp_path, capture_output=True, text=True)
    assert (got.returncode, got.stdout) == (5, f"{alt / 'stages/run.py'} {tmp_path} ['a', 'b']\n"), got
