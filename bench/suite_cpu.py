"""Where the test suite's CPU goes, process by process (Linux: reads `/proc`).

Runs a command (default `make test`) and, twice a second, reads every process's CPU time (user +
system, `/proc/<pid>/stat`) and the machine's (`/proc/stat`). A process is counted from when it is
first seen; processes that lived before the command started are left out, and processes shorter
than one sample are missed (the machine's total says how much: "not attributed"). Each process is
put in a group by its command line (GROUPS, first match); a fork without exec keeps its parent's
command line, so the warm interpreter's stage children are grouped with it.

    python bench/suite_cpu.py                       # make test; writes bench/results/suite_cpu.json
    python bench/suite_cpu.py -- .venv/bin/python -m pytest -q -n 2 --dist loadgroup tests/test_dvc.py

docs/results.md ("The test suite") quotes a run on a fresh clone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
# (substring of the command line, group): the first that matches names the group
GROUPS = [
    ("exec(eval(", "pytest-xdist processes (in-process tests)"),
    ("-m pytest", "pytest's main process"),
    ("forkserver", "warm interpreter and its stage children"),
    ("bin/dvc", "DVC's own processes"),
    ("prefect.server.api", "Prefect test API servers"),
    ("prefect server start", "prefect server (tests/test_deploy.py)"),
    ("_workspace_supervisor", "flow runs of a process worker"),
    ("bin/prefect", "Prefect CLI calls and workers"),
    ("stages.run", "plain stage processes"),
    ("stages.", "stages.* commands (cli, dvcgen, docgen)"),
    ("ray", "Ray (workers and daemons)"),
    ("mlflow", "MLflow servers and job consumers"),
    ("huey", "MLflow servers and job consumers"),
    ("moto", "moto (S3)"),
]


def group(cmd: str) -> str:
    return next((g for k, g in GROUPS if k in cmd), "other")


def machine_busy() -> tuple[float, float]:
    """(busy, all) CPU seconds since boot, every core: user + nice + system, and every state."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks[:3]) / HZ, sum(ticks) / HZ


def read_stat(pid: str) -> tuple[tuple[int, int], float] | None:
    """((pid, start time), CPU seconds: utime + stime) of one process, or None if it has ended. The
    start time tells a reused pid from the process that had it before."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rfind(")") + 2:].split()  # fields 3… of proc(5): state is fields[0]
        return (int(pid), int(fields[19])), (int(fields[11]) + int(fields[12])) / HZ
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None  # ended between the listing and the read


def pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def sample(seen: dict, before: set, now: float) -> None:
    """Read every process once: seen[(pid, start)] = [cpu_s, cmdline, first_seen, last_seen]."""
    for pid in pids():
        if (st := read_stat(pid)) is None or st[0] in before:
            continue
        key, cpu = st
        if key in seen:
            seen[key][0], seen[key][3] = cpu, now
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        seen[key] = [cpu, cmd, now, now]


def existing() -> set:
    """The processes alive now (left out of the count)."""
    return {st[0] for pid in pids() if (st := read_stat(pid)) is not None}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples (default 0.5)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "suite_cpu.json"))
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --); default: make test")
    a = ap.parse_args()
    cmd = [c for c in a.cmd if c != "--"] or ["make", "test"]

    before, seen = existing(), {}
    busy0, all0 = machine_busy()
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        sample(seen, before, time.time() - t0)
        time.sleep(a.every)
    sample(seen, before, time.time() - t0)
    wall = time.time() - t0
    busy1, all1 = machine_busy()
    busy, capacity = busy1 - busy0, all1 - all0

    by, n = Counter(), Counter()
    for cpu, c, *_ in seen.values():
        g = group(c)
        by[g] += cpu
        n[g] += 1
    attributed = sum(by.values())
    print(f"{' '.join(cmd)}: exit status {proc.returncode}, {wall:.0f} s; machine busy {busy:.0f} of "
          f"{capacity:.0f} core-s ({busy / wall:.2f} cores)")
    print(f"{'core-s':>8} {'procs':>6}  group")
    for g, v in by.most_common():
        print(f"{v:8.1f} {n[g]:6d}  {g}")
    print(f"{busy - attributed:8.1f} {'':>6}  not attributed (processes shorter than a sample, the kernel)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "cmd": cmd, "exit_status": proc.returncode, "wall_s": wall, "machine_busy_core_s": busy,
        "machine_core_s": capacity, "cpu": cpu_model(), "cores": os.cpu_count(),
        "groups": {g: {"core_s": round(v, 1), "processes": n[g]} for g, v in by.most_common()},
        "processes": sorted(({"cpu_s": c, "cmd": cmd_[:300], "first_s": round(f, 1), "last_s": round(l, 1)}
                             for c, cmd_, f, l in seen.values() if c >= 1.0), key=lambda r: -r["cpu_s"]),
    }, indent=1))
    print(f"wrote {out}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
