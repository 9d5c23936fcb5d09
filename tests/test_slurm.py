"""slurm/*.sbatch on a real one-node SLURM cluster (tests/slurm/cluster.sh, started once for this
module): 2 CPU ranks per job, losses compared with the same run under plain torchrun."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PROGRAMS, REPO, TRAIN_PY, free_port, losses
from medgpt.launch_env import slurm_master_port

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
PRINT_RANK_PY = PROGRAMS / "print_rank.py"


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start the cluster (installing SLURM if needed); yield the environment jobs are submitted with."""
    state = tmp_path_factory.mktemp("slurm-state")
    cluster_env = {**os.environ, "MEDGPT_SLURM_STATE": str(state), "SLURMCTLD_PORT": str(free_port()),
                   "SLURMD_PORT": str(free_port())}
    subprocess.run(["bash", str(CLUSTER_SH), "start"], env=cluster_env, check=True, timeout=600)
    try:
        # sbatch hands this environment to the job: the interpreter running the tests, 2 CPU ranks.
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "MEDGPT_PYTHON": sys.executable,
               "MEDGPT_NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=cluster_env, timeout=120)


def submit(env: dict[str, str], log_dir: Path, script: str, *args: str, options: tuple[str, ...] = ()) -> int:
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *options, script, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().split(";")[0])


def job_info(env: dict[str, str], job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", str(job_id)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(env: dict[str, str], job_id: int, done, what: str, timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job_id)
        if done(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: timed out waiting for {what}; last state {info}")


def finished(env: dict[str, str], job_id: int) -> dict[str, str]:
    return wait_until(env, job_id, lambda i: i["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING",
                                                                  "COMPLETING", "REQUEUED"), "the end")


def release_now(env: dict[str, str], job_id: int) -> bool:
    """Skip the ~2 minutes SLURM holds a requeued job (Reason=BeginTime); False: not running yet.
    Repeated until it starts, since an update made while the old run is still ending is lost."""
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True)
    return False


def short_hostname() -> str:
    """This machine's name as SLURM's node list and a deepspeed hostfile write it."""
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()


def log_of(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.out")))  # ranks interleave bytes


@pytest.mark.slurm
def test_sbatch_torchrun_completes(slurm_env, reference_args, two_rank_reference, tmp_path):
    """Also while another process listens on the port derived from the job id (as another job on a
    shared node may): the rendezvous takes another one."""
    out = tmp_path / "run"
    env = {**slurm_env, "MEDGPT_CONFIG": "configs/smoke.yaml"}  # then the test's flags, which win
    job = submit(env, tmp_path, "slurm/train.sbatch", *reference_args(out), options=("--hold",))
    with socket.create_server(("", slurm_master_port(job))):  # another job's store, say
        subprocess.run(["scontrol", "release", str(job)], env=slurm_env, check=True)
        info = finished(slurm_env, job)
    log = log_of(tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[:3000] + "\n[...]\n" + log[-5000:]
    assert "1 node(s) x 2 rank(s)" in log
    port = int(re.search(r"rendezvous \S+:(\d+)", log).group(1))
    assert port != slurm_master_port(job)
    assert (out / "export" / "model.safetensors").is_file()
    assert losses(out) == losses(two_rank_reference)


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_env, reference_args, two_rank_reference, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm_env, tmp_path, "slurm/train.sbatch", *reference_args(out))
    wait_until(slurm_env, job, lambda i: i["JobState"] == "RUNNING" and any((out / "tensorboard").glob("ev*")),
               "the first logged step")
    # What SLURM does before a time limit (--signal=B:USR1@300), now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm_env, check=True)
    wait_until(slurm_env, job, lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING", "the requeue")
    # slurmd revokes the old run's credential with 1-second resolution: a restart released within
    # the same second is refused ("Job credential revoked") and the job FAILS. Real requeues wait
    # ~2 minutes (BeginTime); the test releases the job early, but not within that second.
    time.sleep(2)
    wait_until(slurm_env, job, lambda i: i["JobState"] != "PENDING" or release_now(slurm_env, job), "the restart")
    info = finished(slurm_env, job)
    log = log_of(tmp_path)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, log[-5000:])
    assert "stop requested (SIGUSR1): saved step" in log and "requeueing job" in log and "(restart 1)" in log
    got, want = losses(out), losses(two_rank_reference)
    assert [step for step, _ in got] == [step for step, _ in want]  # one point per step, no duplicates
    assert got == want  # every step, before and after the requeue: the same loss bit for bit


@pytest.mark.slurm
def test_sbatch_deepspeed_launcher_completes(slurm_env, reference_args, two_rank_reference, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm_env, tmp_path, "slurm/train_deepspeed.sbatch", *reference_args(out))
    info = finished(slurm_env, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_of(tmp_path)[-5000:]
    host = short_hostname()
    assert (tmp_path / f"medgpt-ds-{job}.hostfile").read_text() == f"{host} slots=2\n"  # next to the log
    assert (out / "export" / "model.safetensors").is_file()
    assert losses(out) == losses(two_rank_reference)


@pytest.mark.slurm
def test_srun_tasks_are_ranks(slurm_env, tmp_path):
    """srun-direct: 2 tasks of one srun step are ranks 0 and 1 of 2 in one process group; a plain
    python in the batch script of the same 2-task job is not a task of a step: rank 0 of 1."""
    script = tmp_path / "ranks.sh"
    script.write_text(f'#!/bin/bash\n"$MEDGPT_PYTHON" "{PRINT_RANK_PY}"\n'
                      f'srun --label "$MEDGPT_PYTHON" "{PRINT_RANK_PY}"\n')
    job = submit(slurm_env, tmp_path, str(script), options=("--nodes=1", "--ntasks=2"))
    info = finished(slurm_env, job)
    lines = log_of(tmp_path).splitlines()
    assert info["JobState"] == "COMPLETED", lines[-40:]
    assert "rank 0 of 1 local 0 sum 1" in lines
    assert {"0: rank 0 of 2 local 0 sum 2", "1: rank 1 of 2 local 1 sum 2"} <= set(lines)


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/train_deepspeed.sbatch"])
def test_sbatch_script_outside_slurm(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"medgpt-slurm: error: {script} is a SLURM batch script; submit it with: "
                                   f"sbatch {script} [medgpt flags]")


FAKE_JOB = {"SLURM_JOB_ID": "41", "SLURM_JOB_NAME": "bad", "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "no-such-node[1-2]"}


@pytest.mark.slurm
def test_sbatch_unresolvable_nodelist(slurm_env):
    proc = subprocess.run(["bash", "slurm/train.sbatch"], cwd=REPO, capture_output=True, text=True,
                          env={**slurm_env, **FAKE_JOB, "SLURM_SUBMIT_DIR": str(REPO)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "cannot resolve the first host of SLURM_JOB_NODELIST='no-such-node[1-2]'" in proc.stderr


@pytest.mark.slurm
def test_srun_task_unresolvable_nodelist(slurm_env, tmp_path):
    env = {**slurm_env, **FAKE_JOB, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
           "SLURM_LOCALID": "0"}
    proc = subprocess.run([sys.executable, TRAIN_PY, "--output_dir", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot resolve 'no-such-node1', the first host of the SLURM node list" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slurm
def test_deepspeed_script_refuses_gpus_it_would_not_use(slurm_env):
    """On a shared node SLURM assigns GPUs 2,3; the deepspeed launcher would use 0,1: refused at start."""
    host = short_hostname()
    job = {**FAKE_JOB, "SLURM_JOB_NODELIST": host, "SLURM_SUBMIT_DIR": str(REPO), "CUDA_VISIBLE_DEVICES": "2,3"}
    proc = subprocess.run(["bash", "slurm/train_deepspeed.sbatch"], cwd=REPO, capture_output=True, text=True,
                          env={**slurm_env, **job})
    assert proc.returncode == 2, proc.stderr
    assert "SLURM gave this job GPUs 2,3 of a shared node" in proc.stderr and "slurm/train.sbatch" in proc.stderr
