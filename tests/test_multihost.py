"""Two hosts without a cluster: two network namespaces joined by a veth pair, one torchrun per
"host" (2 nodes x 1 rank), c10d rendezvous and gloo over the veth. The per-step losses equal
1 node x 2 ranks."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from conftest import REPO, TRAIN_PY, check_ok, launch_env, losses

pytestmark = pytest.mark.netns  # root, to make the namespaces (netns tests count as e2e: conftest.py)

ADDRESSES = ("10.77.0.1", "10.77.0.2")  # only inside the namespaces made here
PORT = 29577


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces, each with lo up and one end of a veth pair: [(namespace, interface), ...]."""
    tag = f"mg{os.getpid() % 100000}"
    hosts = [(f"{tag}-host{k}", f"{tag}v{k}") for k in range(2)]
    try:
        for name, _ in hosts:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        (ns0, if0), (ns1, if1) = hosts
        ip("link", "add", if0, "netns", ns0, "type", "veth", "peer", "name", if1, "netns", ns1)
        for (name, ifname), address in zip(hosts, ADDRESSES, strict=True):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", ifname)
            ip("-n", name, "link", "set", ifname, "up")
        yield hosts
    finally:
        for name, _ in hosts:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def torchrun_on_host(namespace: str, ifname: str, node_rank: int, args: list[str]) -> subprocess.Popen:
    """torchrun for one node of two inside a namespace; node 0 hosts the c10d rendezvous store."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{ADDRESSES[0]}:{PORT}", "--rdzv_id", "netns",
                # The store host is found by hostname, which both namespaces share: say it explicitly.
                "--rdzv_conf", f"is_host={node_rank == 0}",
                # Workers reach rank 0 at this address (the default, the machine's FQDN, is not on the veth).
                "--local_addr", ADDRESSES[node_rank]]
    return subprocess.Popen(["ip", "netns", "exec", namespace, *torchrun, TRAIN_PY, *args], cwd=REPO,
                            env=launch_env({"GLOO_SOCKET_IFNAME": ifname}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_namespaces_match_one_node(two_hosts, two_rank_reference, reference_args, tmp_path):
    out = tmp_path / "netns"
    procs = [torchrun_on_host(ns, ifname, k, reference_args(out)) for k, (ns, ifname) in enumerate(two_hosts)]
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            check_ok(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # a node left waiting for a failed peer
            proc.kill()
    got, want = losses(out), losses(two_rank_reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, value), (_, expected) in zip(got, want, strict=True):
        assert math.isclose(value, expected, rel_tol=1e-5), (step, value, expected)
