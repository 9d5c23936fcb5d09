"""A checkpoint that does not fit on its disk: one line saying so, exit 1 (a crash with a known
cause), `latest` still on the last complete checkpoint, which resumes once there is space."""
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ERROR, check_ok, latest_step, launch, losses, tiny_args

pytestmark = pytest.mark.tmpfs  # root, to mount it

CHECKPOINT_MIB = 43  # the tiny model's ZeRO-0 checkpoint: fp32 weights and two Adam moments


@contextmanager
def small_disk(mountpoint: Path, mib: int):
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


@pytest.mark.parametrize("launcher, nproc", [("python", 1), ("torchrun", 2)])
def test_a_full_disk_during_a_save_says_so_and_keeps_latest(tmp_path, data_cache, launcher, nproc):
    """Before: exit 1 with torch's "unexpected pos" traceback and no word about space."""
    with small_disk(tmp_path / "disk", mib=int(CHECKPOINT_MIB * 1.6)) as disk:  # room for one checkpoint
        out = disk / "run"
        args = tiny_args(out, data_cache, max_steps=6, save_every=2, keep_last=0, eval_every=0)
        proc = launch(args, launcher=launcher, nproc=nproc)
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith(ERROR)]
        assert errors == [f"{ERROR}no space left on {out / 'checkpoints'} while saving step4: a checkpoint needs "
                          f"about {CHECKPOINT_MIB - 1} MiB, 0 MiB are free; 'latest' still names step2. Free space "
                          "there (or lower --keep_last), delete the partial step4, and rerun to resume"], errors
        assert f'File "{Path(__file__).parents[1] / "medgpt"}' not in proc.stderr  # no traceback of medgpt's own
        assert latest_step(out) == 2
        # Space made, as the line says: the rerun resumes from step 2 and finishes.
        subprocess.run(["rm", "-r", str(out / "checkpoints" / "step4")], check=True)
        subprocess.run(["mount", "-o", f"remount,size={CHECKPOINT_MIB * 5}m", str(disk)], check=True)
        check_ok(launch(args, launcher=launcher, nproc=nproc))
        assert [step for step, _ in losses(out)] == list(range(1, 7))
