"""launcher/sweep.py: a grid of folds x seeds as normal medgpt runs, locally one after another
(interrupted, resumed, skipped when finished) and on a real SLURM cluster as a job array with one
task preempted and requeued, then the report job."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, alive, launch_env, read_scalars, refused, run_pids, tiny_args
from medgpt.config import parse_config
from medgpt.errors import PREEMPTED_EXIT, UserError
from medgpt.run_lock import lock_holder
from medgpt.sweep_plan import SweepRequest, plan_sweep, write_sweep
from test_slurm import job_info, release_now, slurm_env, wait_until  # noqa: F401 (slurm_env: a fixture)

SWEEP_PY = str(REPO / "launcher" / "sweep.py")
STEPS = 12
RUN_NAMES = ["fold0_seed1", "fold0_seed2", "fold1_seed1", "fold1_seed2"]


def train_flags(cache: Path, **overrides: object) -> list[str]:
    """The tests' tiny fp32 run without --output_dir (the sweep sets it), scoring the test set quickly."""
    args = tiny_args(Path("unused"), cache, **{"max_steps": STEPS, "eval_every": 0, "seq_len": 128,
                                                "eval_batch_size": 64, **overrides})
    cut = args.index("--output_dir")
    return args[:cut] + args[cut + 2:]


def sweep_command(sweep_dir: Path, *flags: str, train: list[str]) -> list[str]:
    return [sys.executable, SWEEP_PY, str(sweep_dir), "--folds", "0,1", "--seeds", "1,2", *flags, "--", *train]


def sweep(sweep_dir: Path, *flags: str, train: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(sweep_dir, *flags, train=train), cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=900)


def request(sweep_dir: Path, **fields: object) -> SweepRequest:
    return SweepRequest(sweep_dir=str(sweep_dir), **fields)


# --- What runs (no training).

def test_a_grid_is_every_combination_of_normal_runs(tmp_path):
    plan = plan_sweep(request(tmp_path / "s", folds="0-1", seeds="7,3", grid=("lr=1e-4,3e-4",)), ["--max_steps", "5"])
    assert [run.name for run in plan.runs] == [f"lr-{lr}_fold{f}_seed{s}" for lr in ("1e-4", "3e-4")
                                               for f in (0, 1) for s in (7, 3)]
    for run in plan.runs:
        cfg = parse_config(run.args)
        assert (cfg.data.fold, cfg.train.seed, cfg.optim.lr, cfg.train.max_steps) == (
            run.fold, run.seed, float(run.overrides["lr"]), 5)
        assert cfg.train.output_dir == str(tmp_path / "s" / "runs" / run.name) and cfg.train.resume == "auto"
    # An array task reads its run's flags from sweep.json (slurm/common.sh).
    write_sweep(plan)
    proc = subprocess.run([sys.executable, "-m", "medgpt.sweep_plan", str(tmp_path / "s"), "5"], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == plan.runs[5].args
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert (saved["folds"], saved["seeds"], saved["grid"]) == ([0, 1], [7, 3], {"lr": ["1e-4", "3e-4"]})
    assert saved["runs"][5]["overrides"] == {"lr": "3e-4"} and saved["runs"][5]["fold"] == 0


def test_bad_sweep_input_is_refused_before_anything_runs(tmp_path):
    target = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, SWEEP_PY, str(target), "--folds", "0,10", "--seeds", "1-x",
                           "--grid", "lrr=1", "--grid", "seed=1,2", "--grid", "ds_config=a/z.json,b/z.json",
                           "--", "--fold", "2"], cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert refused(proc) == [
        "--folds '0,10': folds are 0..9, the official cross-validation folds",
        "--seeds '1-x': '1-x' is not a number or a range a-b; write e.g. 0,1 or 0-4",
        "--grid 'lrr=1': lrr is not a training flag; did you mean lr?",
        "--grid 'seed=1,2': seed is set by --seeds",
        "--grid 'ds_config=a/z.json,b/z.json': each flag once, each value once (a path by its file name, which "
        "names the runs' folders)",
        "--fold among the training flags: it is set by --folds"]
    # Each run's whole training command line is checked: a problem of every run once, one of a grid value with it.
    proc = subprocess.run([sys.executable, SWEEP_PY, str(target), "--grid", "dropout=0.1,2", "--", "--lr=-1"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert refused(proc) == ["lr must be > 0 (got -1.0)", "dropout must be in [0, 1) (got 2.0) (with dropout=2)"]
    proc = subprocess.run([sys.executable, SWEEP_PY, str(target), "--launcher", "python", "--nproc", "2",
                           "--max_steps", "3"], cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert refused(proc)[-1] == ("training flags go after '--': launcher/sweep.py DIR [sweep flags] -- "
                                 "[training flags]")
    assert not target.exists()


def test_a_folder_of_another_sweep_or_other_files_is_refused(tmp_path):
    write_sweep(plan_sweep(request(tmp_path / "s", folds="0,1"), ["--max_steps", "5"]))
    plan_sweep(request(tmp_path / "s", folds="0,1", launcher="torchrun", nproc=2), ["--max_steps", "5"])  # a rerun
    with pytest.raises(UserError, match="holds another sweep"):
        plan_sweep(request(tmp_path / "s", folds="0,1"), ["--max_steps", "6"])
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"is not empty and holds no sweep\.json"):
        plan_sweep(request(tmp_path / "other"), [])


# --- A local sweep: interrupted in its first run, rerun to the end, rerun again (nothing to do).

@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    out, train = root / "sweep", train_flags(data_cache)
    first_run = out / "runs" / RUN_NAMES[0]
    # 1. Under the deepspeed launcher (1 rank); SIGTERM to the sweep once its first run has trained a step.
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen(sweep_command(out, "--launcher", "deepspeed", "--nproc", "1", train=train), cwd=REPO,
                                env=launch_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        while not list((first_run / "tensorboard").glob("events*")):
            assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    stopped = subprocess.CompletedProcess(proc.args, proc.returncode, (root / "first.log").read_text(), "")
    started = sorted(p.name for p in (out / "runs").iterdir())
    # 2. Rerun, now one python process a run: the stopped run resumes, the three others run.
    rerun = sweep(out, "--launcher", "python", train=train)
    mtimes = {name: (out / "runs" / name / "test_metrics.json").stat().st_mtime_ns for name in RUN_NAMES}
    # 3. Everything finished: skipped, nothing started.
    again = sweep(out, "--launcher", "python", train=train)
    return dict(out=out, stopped=stopped, started=started, rerun=rerun, again=again, mtimes=mtimes)


@pytest.mark.e2e
def test_sweep_stops_on_a_signal_after_its_run_saved(local_sweep):
    stopped, out = local_sweep["stopped"], local_sweep["out"]
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stdout[-3000:]
    assert "sweep: SIGTERM received" in stopped.stdout
    assert f"not started: {', '.join(RUN_NAMES[1:])}" in stopped.stdout
    assert local_sweep["started"] == RUN_NAMES[:1]
    log = (out / "logs" / f"{RUN_NAMES[0]}.log").read_text()
    assert "deepspeed.launcher.runner --num_gpus 1" in log and "stop requested (SIGTERM): saved step" in log


@pytest.mark.e2e
def test_rerun_resumes_the_stopped_run_and_runs_the_rest(local_sweep):
    rerun, out = local_sweep["rerun"], local_sweep["out"]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count(": done after") == 4 and "sweep: 4 of 4 runs finished" in rerun.stdout
    log = (out / "logs" / f"{RUN_NAMES[0]}.log").read_text()
    saved_step = int(re.search(r"stop requested \(SIGTERM\): saved step (\d+)", log)[1])
    assert 0 < saved_step < STEPS
    # The second attempt trained only the steps after the saved one; every step is logged once.
    events = sorted((out / "runs" / RUN_NAMES[0] / "tensorboard").glob("events*"), key=lambda p: p.stat().st_mtime)
    assert len(events) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    second = EventAccumulator(str(events[1]), size_guidance={"scalars": 0})
    second.Reload()
    assert [e.step for e in second.Scalars("train/loss")] == list(range(saved_step + 1, STEPS + 1))
    assert [step for step, _ in read_scalars(out / "runs" / RUN_NAMES[0])["train/loss"]] == list(range(1, STEPS + 1))


@pytest.mark.e2e
def test_each_run_is_a_normal_run_of_its_fold_and_seed(local_sweep):
    out = local_sweep["out"]
    described = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["fold"], r["seed"], r["overrides"]) for r in described["runs"]] == [
        (name, int(name[4]), int(name[-1]), {}) for name in RUN_NAMES]
    for name in RUN_NAMES:
        run = out / "runs" / name
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["data"]["fold"], cfg["train"]["seed"], cfg["train"]["output_dir"]) == (
            int(name[4]), int(name[-1]), str(run))
        assert set(json.loads((run / "test_predictions.json").read_text())) == set(
            json.loads((REPO.parent / "shared/data/pubmedqa/test_ground_truth.json").read_text()))
        assert (run / "export" / "model.safetensors").is_file()
        assert [s for s, _ in read_scalars(run)["train/loss"]] == list(range(1, STEPS + 1))
    # Seeds and folds differ: so do the runs' losses.
    assert len({tuple(read_scalars(out / "runs" / name)["train/loss"]) for name in RUN_NAMES}) == 4


@pytest.mark.e2e
def test_rerun_of_a_finished_sweep_skips_every_run(local_sweep):
    again, out = local_sweep["again"], local_sweep["out"]
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("finished before, skipped") == 4 and "running" not in again.stdout
    assert {name: (out / "runs" / name / "test_metrics.json").stat().st_mtime_ns
            for name in RUN_NAMES} == local_sweep["mtimes"]


@pytest.mark.e2e
def test_a_failed_run_does_not_stop_the_sweep(tmp_path, data_cache):
    proc = sweep(tmp_path / "s", "--launcher", "python", "--seeds", "1",
                 train=train_flags(data_cache, ds_config=tmp_path / "missing.json"))
    assert proc.returncode == 1, proc.stdout[-3000:]
    for name in ("fold0_seed1", "fold1_seed1"):  # both tried, both named
        assert f"sweep: FAILED {name} (exit 2): see {tmp_path / 's' / 'logs' / name}.log" in proc.stdout
        assert json.loads((tmp_path / "s" / "status" / f"{name}.json").read_text())["exit_code"] == 2
    assert "sweep: 0 of 2 runs finished" in proc.stdout


@pytest.mark.e2e
def test_a_killed_sweeps_run_stops_and_no_rerun_starts_while_it_runs(tmp_path, data_cache):
    """Before: after kill -9 of the sweep its run trained on, orphaned, and a rerun started a second
    run in the same folder (every log line doubled)."""
    out, train = tmp_path / "s", train_flags(data_cache, max_steps=1000)
    command = [sys.executable, SWEEP_PY, str(out), "--folds", "0", "--seeds", "1", "--launcher", "python", "--", *train]
    run_dir = out / "runs" / "fold0_seed1"
    with open(tmp_path / "sweep.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        while not list((run_dir / "tensorboard").glob("events*")):
            assert first.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.2)
        (rank,) = run_pids(run_dir)
        rerun = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
        assert refused(rerun) == [f"run fold0_seed1 is still running (pid {rank} on {socket.gethostname()}) in "
                                  f"{run_dir}; wait for it to end (or stop it), then run the sweep again"]
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 60  # the run's stop: its step and a checkpoint (stop_timeout 25 s)
        while alive(run_pids(run_dir)) or lock_holder(run_dir):  # an exiting process closes its files last
            assert time.monotonic() < deadline, f"the killed sweep's run still runs: {alive(run_pids(run_dir))}"
            time.sleep(0.2)
    finally:
        first.kill()
        for pid in alive(run_pids(run_dir)):
            os.kill(pid, signal.SIGKILL)
    assert re.search(r"stop requested \(SIGTERM\): saved step \d+, exiting with 75",
                     (out / "logs" / "fold0_seed1.log").read_text())


# --- On SLURM: a job array, one task preempted and requeued, then the report job.

@pytest.mark.slurm
def test_sweep_as_a_slurm_job_array(slurm_env, data_cache, tmp_path):  # noqa: F811 (the imported fixture)
    out = tmp_path / "sweep"
    proc = subprocess.run(sweep_command(out, "--launcher", "torchrun", "--nproc", "2", "--slurm",
                                        train=train_flags(data_cache, max_steps=20)),
                          cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = int(re.search(r"sweep: array job (\d+)", proc.stdout)[1])
    report = int(re.search(r"sweep: report job (\d+)", proc.stdout)[1])
    assert job_info(slurm_env, report)["Dependency"].startswith(f"afterok:{array}")
    # Preempt task 0 (fold0_seed1) once it has trained a step: it saves, requeues itself, resumes.
    task0 = f"{array}_0"
    wait_until(slurm_env, task0, lambda i: i["JobState"] == "RUNNING"
               and any((out / "runs" / RUN_NAMES[0] / "tensorboard").glob("ev*")), "the first logged step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", task0], env=slurm_env, check=True)
    wait_until(slurm_env, task0, lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING", "the requeue")
    time.sleep(2)  # not within the second of the old run's credential (tests/test_slurm.py)
    wait_until(slurm_env, task0, lambda i: i["JobState"] != "PENDING" or release_now(slurm_env, task0), "restart")
    # The report job runs only once every task has succeeded (afterok; a failed task cancels it).
    done = wait_until(slurm_env, report, lambda i: i["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                      "the report job", timeout=900)
    report_log = next((out / "logs").glob(f"*-report-{report}.out"))  # it ran
    logs = [next((out / "logs").glob(f"*-{array}_{i}.out")).read_text(errors="replace") for i in range(4)]
    for i, name in enumerate(RUN_NAMES):
        assert f"sweep {out}, run {i}" in logs[i] and "1 node(s) x 2 rank(s)" in logs[i], logs[i][-3000:]
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert (cfg["data"]["fold"], cfg["train"]["seed"]) == (int(name[4]), int(name[-1]))
        assert [s for s, _ in read_scalars(out / "runs" / name)["train/loss"]] == list(range(1, 21))  # each once
        assert (out / "runs" / name / "export" / "model.safetensors").is_file()
    # Only the preempted task restarted (SLURM forgets finished tasks after MinJobAge: their logs say it).
    assert "stop requested (SIGUSR1): saved step" in logs[0] and "requeueing job" in logs[0]
    assert logs[0].count("(restart 0)") == 1 and logs[0].count("(restart 1)") == 1
    assert all(log.count("(restart 0)") == 1 and "(restart 1)" not in log for log in logs[1:])
    # launcher/report.py comes from the report branch: this holds once it is merged.
    assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), report_log.read_text()[-3000:]
    assert (out / "report" / "report.md").is_file()  # launcher/report.py writes into <sweep>/report/
