"""Where a run's numbers come from (medgpt/provenance.py), read from this machine and checkout.
A real run's records of it: tests/test_evaluate.py and tests/test_report.py."""
import socket

import deepspeed
import torch
import transformers

from conftest import checkout_commit
from medgpt.distributed import Dist
from medgpt.provenance import device_name, library_versions, run_provenance, source_version


def test_versions_are_the_installed_ones():
    versions = library_versions()
    assert (versions["torch"], versions["transformers"]) == (torch.__version__, transformers.__version__)
    assert versions["deepspeed"] == deepspeed.__version__ and versions["python"].count(".") == 2
    assert set(versions) >= {"medgpt", "datasets", "peft"}  # peft: None where the extra is not installed


def test_the_source_is_this_checkouts_commit_and_a_folder_without_git_has_none(tmp_path):
    assert source_version() == checkout_commit()
    assert source_version(tmp_path) is None


def test_one_process_names_its_host_and_cpu():
    provenance = run_provenance(Dist.single())
    assert provenance["hosts"] == [socket.gethostname()] and provenance["world_size"] == 1
    assert provenance["devices"] == {f"cpu: {device_name(torch.device('cpu'))}": 1}
    assert device_name(torch.device("cpu")) != "cpu"  # the model name, from /proc/cpuinfo
