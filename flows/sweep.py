"""A sweep: one recipe over a grid of overrides, one deployment run per trial on the work pool.

    fastgen sweep toy_cd -S stages.cd.method.N=8,18 -S stages.cd.train.lr=1e-4,5e-4 --max-parallel 2

The flow `fastgen-sweep` (this module's `sweep`; also a deployment in prefect.yaml, whose form takes
the grid as a mapping key -> list of values):

1. validates every trial (the recipe with its overrides) before submitting any;
2. opens one MLflow sweep run (found again by the sweep's id when the sweep is rerun); each trial's
   pipeline run is nested under it and tagged with its overrides (`fastgen.overrides`), and the
   trial's stage runs are nested under that;
3. submits each trial as a run of the recipe's deployment `fastgen/<recipe>` (so trials spread over
   every worker of the pool, and training stages go to Ray when the recipe says `compute: ray`),
   with at most `max_parallel` in flight. The sweep waits in its own process (the CLI's, or a
   worker of another pool), never in a slot of the trials' pool;
4. gives each trial its own storage root, `<storage.root>/sweeps/<sweep id>/<trial>`, and a shared
   reuse folder (`stages/reuse.py`): a stage with the same params and inputs in every trial (the
   teacher) is computed by the first trial that reaches it and copied by the others;
5. keys each submission with an idempotency key `<sweep id>/<trial>[/retryN]`: a rerun of the same
   sweep finds its finished trials (nothing resubmitted), waits for those still running, and
   resubmits only the trials whose run failed, crashed or was cancelled;
6. takes a trial run as lost when it has been silent too long, and resubmits it. A flow run whose
   worker (or machine) died — SIGKILL, OOM, a node gone — stays Pending or Running in Prefect 3:
   nothing on a self-hosted server marks it Crashed (Prefect's "zombie" detection is an automation
   one creates on flow-run heartbeat events). So every trial emits Prefect's flow-run heartbeat
   events every `HEARTBEAT_S`, and a Pending or Running trial run with no event at all (heartbeat,
   a stage's task-run state, its own state change) for `lost_after_s` is set Crashed by the sweep,
   with a message saying so, and submitted again under its next key — by the sweep that was
   waiting on it, or by a rerun of a sweep that was itself killed. A run whose worker died but whose
   own process lives on (Prefect starts each flow run in its own session) keeps sending heartbeats
   and is waited for. Clocks: an event's time is the trial machine's, compared with this one's;
   keep `lost_after_s` well above the skew;
7. keeps going when a trial fails, and reports every trial's final state.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from flows.pipeline import SWEEP_ENV, SWEEP_RUN_ENV, RecipeName  # noqa: F401  (sets Prefect's env defaults)
from prefect import flow, get_run_logger
from prefect.states import Crashed, Failed

from stages import reuse, storage, tracking
from stages.recipe import RecipeError
from stages.sweep import (HEARTBEAT_S, LOST_AFTER_S, MAX_TRIALS, check_size, load_with_overrides, sweep_id,
                          trial_name, trial_overrides, trials, validate_trials)

FINAL_BAD = ("FAILED", "CRASHED", "CANCELLED")
LIVE = ("PENDING", "RUNNING")  # states a run whose process died keeps
MAX_LOST = 2  # resubmissions of a lost trial run within one sweep invocation
LISTEN_S = 5  # how often the sweep asks whether a flying trial run is still heard of


def last_heard(pc, fr) -> datetime:
    """When flow run `fr` was last heard of: its newest event (its heartbeats, its task runs'
    state changes), or the start of its current state if none came since."""
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventOccurredFilter

    since = fr.state.timestamp
    page = pc.read_events(EventFilter(  # newest first
        any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{fr.id}"]),
        occurred=EventOccurredFilter(since=since, until=datetime.now(timezone.utc) + timedelta(days=1))), limit=1)
    return max([since, *(e.occurred for e in page.events)])


def lost(pc, fr, lost_after_s: float) -> str | None:
    """Why a Pending or Running run is taken as lost (silent for more than `lost_after_s`), or None."""
    st = fr.state.type.value if fr.state else None
    now = datetime.now(timezone.utc)
    if st not in LIVE or (now - fr.state.timestamp).total_seconds() <= lost_after_s:
        return None
    seen = last_heard(pc, fr)
    silent = (now - seen).total_seconds()
    if silent <= lost_after_s:
        return None
    return (f"lost: {st} but silent for {silent:.0f} s (no heartbeat or other event since {seen:%Y-%m-%d %H:%M:%S} "
            f"UTC; limit {lost_after_s:.0f} s): its process, worker or machine is gone; set Crashed by the sweep")


def mark_lost(pc, fr, why: str, log) -> None:
    pc.set_flow_run_state(fr.id, Crashed(message=why), force=True)
    log.warning(f"trial run {fr.name} ({fr.id}) {why}")


def sweep_root(base, sid: str) -> str:
    root = base.storage.root.rstrip("/")
    if not storage.is_remote(root):
        root = os.path.abspath(root)
    return f"{root}/sweeps/{sid}"


def _mlflow_sweep_run(base, sid: str, grid: dict) -> tuple[Any, str | None]:
    """The sweep's MLflow run (found by its id, else created)."""
    if not base.tracking.enabled:
        return None, None
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(base)
    client = MlflowClient(uri)
    exp = tracking._experiment(client, base.tracking.experiment or base.name, uri)
    found = client.search_runs([exp], f"tags.`fastgen.sweep` = '{sid}' and tags.`fastgen.level` = 'sweep'",
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return client, found[0].info.run_id
    run = client.create_run(exp, run_name=f"sweep {sid}", tags={
        "fastgen.level": "sweep", "fastgen.sweep": sid, "fastgen.recipe": base.name,
        "fastgen.grid": tracking.scrub(json.dumps(grid, sort_keys=True)), "fastgen.trials": str(len(trials(grid)))})
    return client, run.info.run_id


def _submit(deployment: str, overrides: dict, key: str, env: dict):
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters={"overrides": overrides}, idempotency_key=key, timeout=0,
                          as_subflow=False, job_variables={"env": env}, tags=["fastgen-sweep"])


@flow(name="fastgen-sweep", flow_run_name="{recipe}-sweep")
def sweep(recipe: RecipeName, grid: dict[str, list[Any]], overrides: dict[str, Any] = {},  # noqa: B006 (read only)
          max_parallel: int = 4, poll_s: float = 2.0, lost_after_s: float = LOST_AFTER_S,
          max_trials: int = MAX_TRIALS) -> dict[str, dict]:
    """Run `recipe` for every combination of `grid` (dotted key -> values) on the work pool, with
    `overrides` applied to every trial; returns trial -> {state, flow_run, overrides}. A trial run
    silent for `lost_after_s` seconds (more than the trials' heartbeat period) is lost: set
    Crashed and submitted again. A grid of more than `max_trials` trials is refused."""
    log = get_run_logger()
    if max_parallel < 1:
        return Failed(message=f"max_parallel: {max_parallel}: at least 1 trial must be in flight")
    if not lost_after_s > HEARTBEAT_S:
        return Failed(message=f"lost_after_s: {lost_after_s} s: must exceed the trials' heartbeat period "
                      f"({HEARTBEAT_S} s), or live trials would be taken as lost")
    try:
        check_size(grid, max_trials)
        base = load_with_overrides(recipe, overrides or {})
        sid = sweep_id(base, grid)
        root = sweep_root(base, sid)
        todo = [(trial_name(t), trial_overrides(overrides or {}, root, t), t) for t in trials(grid)]
        validate_trials(recipe, {}, None, [ov for _, ov, _ in todo])  # every trial as it will be submitted
    except RecipeError as e:
        return Failed(message="; ".join(e.problems))
    client, run_id = _mlflow_sweep_run(base, sid, grid)
    env = {SWEEP_ENV: sid, SWEEP_RUN_ENV: run_id or "", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    if not storage.is_remote(root):
        env[reuse.ENV] = f"{root}/.reuse"
    deployment = f"fastgen/{recipe}"
    log.info(f"sweep {sid}: {len(todo)} trials of {deployment}, at most {max_parallel} at once; outputs under {root}")
    attempts: dict[str, int] = {}
    lost_runs: dict[str, int] = {}  # per trial: its runs found lost
    asked: dict[str, float] = {}  # per trial: when its run was last checked for silence
    flying: dict[str, Any] = {}
    done: dict[str, dict] = {}
    from prefect import get_client

    try:
        with get_client(sync_client=True) as pc:
            while todo or flying:
                while todo and len(flying) < max_parallel:
                    name, ov, t = todo.pop(0)
                    n = attempts.get(name, 0)
                    key = f"{sid}/{name}" + (f"/retry{n}" if n else "")
                    fr = _submit(deployment, ov, key, env)
                    st = fr.state.type.value if fr.state else "SCHEDULED"
                    if st in LIVE and (why := lost(pc, fr, lost_after_s)):  # left by a sweep killed with its worker
                        mark_lost(pc, fr, why, log)
                        st = "CRASHED"
                    if st in FINAL_BAD:  # an earlier attempt of this trial failed: the next key submits anew
                        attempts[name] = n + 1
                        todo.insert(0, (name, ov, t))
                        continue
                    flying[name] = (fr.id, ov, t)
                time.sleep(poll_s if flying else 0)
                for name, (fid, ov, t) in list(flying.items()):
                    fr = pc.read_flow_run(fid)
                    st = fr.state.type.value if fr.state else "SCHEDULED"
                    why = None
                    if st in LIVE and time.time() - asked.get(name, 0) > LISTEN_S:
                        asked[name] = time.time()
                        why = lost(pc, fr, lost_after_s)
                    if why:
                        mark_lost(pc, fr, why, log)
                        lost_runs[name] = lost_runs.get(name, 0) + 1
                        if lost_runs[name] <= MAX_LOST:  # its key now finds a Crashed run: the next key submits anew
                            del flying[name]
                            todo.insert(0, (name, ov, t))
                            continue
                        fr, st = pc.read_flow_run(fid), "CRASHED"
                    if st == "COMPLETED" or st in FINAL_BAD:
                        if st != "COMPLETED":
                            log.warning(f"trial {name} ended {st}: {fr.state.message or ''}")
                        done[name] = {"state": st, "flow_run": str(fid), "overrides": t,
                                      "message": (fr.state.message or "") if st != "COMPLETED" else ""}
                        del flying[name]
    except BaseException as e:  # the sweep's own MLflow run must not stay RUNNING
        if client:
            client.set_tag(run_id, tracking.FAILURE_TAG, tracking.scrub(f"{type(e).__name__}: {e}")[:5000])
            client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    bad = {k: v for k, v in done.items() if v["state"] != "COMPLETED"}
    if client:
        client.set_tag(run_id, "fastgen.trials_completed", str(len(done) - len(bad)))
        if bad:
            client.set_tag(run_id, tracking.FAILURE_TAG, tracking.scrub(
                "; ".join(f"{k}: {v['state']} {v['message']}" for k, v in bad.items()))[:5000])
        client.set_terminated(run_id, "FAILED" if bad else "FINISHED")
    log.info(f"sweep {sid}: {len(done) - len(bad)}/{len(done)} trials completed\n" + "\n".join(
        f"  {v['state']:<10} {k}  flow run {v['flow_run']}" for k, v in sorted(done.items())))
    if bad:
        return Failed(message=f"sweep {sid}: {len(bad)} of {len(done)} trials did not complete: "
                      + "; ".join(f"{k} {v['state']}" for k, v in bad.items()))
    return done


def run_cli(recipe: str, grid: dict, max_parallel: int, lost_after_s: float = LOST_AFTER_S,
            max_trials: int = MAX_TRIALS) -> int:
    """`fastgen sweep` once its arguments are checked (stages.sweep.cli_args): run the sweep flow
    here against $PREFECT_API_URL; print each trial's state; exit 1 if any did not complete."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as pc:  # before the flow: no run made for a sweep that cannot start
        try:
            pc.read_deployment_by_name(f"fastgen/{recipe}")
        except ObjectNotFound:
            print(f"fastgen sweep: no deployment fastgen/{recipe} on {os.environ.get('PREFECT_API_URL')}: "
                  "run `prefect deploy --all` from the project root (infra/README.md)", file=sys.stderr)
            return 2
    state = sweep(recipe, grid, max_parallel=max_parallel, lost_after_s=lost_after_s, max_trials=max_trials,
                  return_state=True)
    if not state.is_completed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    for name, r in sorted(state.result().items()):
        print(f"{r['state']:<10} {name}")
    return 0


def main(argv=None) -> int:
    from stages.sweep import cli_args

    parsed = cli_args(argv)
    return parsed if isinstance(parsed, int) else run_cli(*parsed)


if __name__ == "__main__":
    sys.exit(main())
