"""``launch/train.py`` as a multi-node job on a :class:`netns.Cluster`: one launcher per node, one
process per node, gloo over each node's eth0. Used by tests/test_multinode.py and
benchmarks/multinode_wire.py.

Launchers (the per-node command lines a user types on a real cluster, one per node):

- ``torchrun``: ``torchrun --nnodes N --node_rank I --nproc_per_node 1 --master_addr ADDR0
  --master_port P launch/train.py ...`` (static rendezvous; node 0's agent hosts the store);
- ``torchrun-c10d``: ``torchrun --nnodes N --nproc_per_node 1 --rdzv_backend c10d
  --rdzv_endpoint ADDR0:P --rdzv_id ID [--rdzv_conf is_host=1 on node 0] --local_addr ADDR_I launch/train.py ...``
  (ranks given out by the rendezvous);
- ``deepspeed``: ``deepspeed --hostfile H --no_ssh --node_rank I --master_addr ADDR0
  --master_port P launch/train.py ...`` (DeepSpeed 0.19's launch without ssh/pdsh: each node runs
  the runner itself; the hostfile only gives the node count and slots).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from netns import IFACE, Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
LAUNCHERS = ("torchrun", "torchrun-c10d", "deepspeed")
_port = [29400]


def node_env(**extra: str) -> dict:
    """The environment of every node's launcher: gloo on eth0, one thread, the CPU accelerator."""
    return dict(os.environ, GLOO_SOCKET_IFNAME=IFACE, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                PYTHONUNBUFFERED="1", **extra)


def tool(name: str) -> str:
    """The console script next to this Python (the venv's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)


def node_command(launcher: str, cluster: Cluster, nodes: Sequence[int], index: int, args: Sequence[str],
                 port: int) -> list[str]:
    """The command node ``nodes[index]`` runs; ``nodes[0]`` is the master."""
    master, count = cluster.address(nodes[0]), len(nodes)
    if launcher == "torchrun":
        return [tool("torchrun"), "--nnodes", str(count), "--node_rank", str(index), "--nproc_per_node", "1",
                "--master_addr", master, "--master_port", str(port), TRAIN, *args]
    if launcher == "torchrun-c10d":
        # torchrun finds the store's host, and tells the workers where rank 0 is, by the machine's
        # hostname, which the namespaces share with the machine: is_host and --local_addr say it instead
        return [tool("torchrun"), "--nnodes", str(count), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{master}:{port}", "--rdzv_id", f"job{port}",
                "--rdzv_conf", f"is_host={int(index == 0)}", "--local_addr", cluster.address(nodes[index]), TRAIN, *args]
    if launcher == "deepspeed":
        hostfile = os.path.join(cluster.log_dir, f"hostfile{count}")
        with open(hostfile, "w") as handle:
            handle.write("".join(f"node{i} slots=1\n" for i in range(count)))
        return [tool("deepspeed"), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(index),
                "--master_addr", master, "--master_port", str(port), TRAIN, *args]
    raise ValueError(f"launcher={launcher!r} is not one of {LAUNCHERS}")


@dataclasses.dataclass
class Job:
    cluster: Cluster
    nodes: list[int]
    processes: dict[int, subprocess.Popen]
    started: float
    ended: dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def codes(self) -> dict[int, int | None]:
        return {node: process.poll() for node, process in self.processes.items()}

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- node {n} (exit {self.codes[n]}) ---\n{self.cluster.log(n)[-tail:]}" for n in self.nodes)

    def poll(self) -> bool:
        """Record exit times; True when every node's launcher has exited."""
        now = time.monotonic()
        for node, process in self.processes.items():
            if node not in self.ended and process.poll() is not None:
                self.ended[node] = now
        return len(self.ended) == len(self.processes)

    def wait(self, timeout: float, nodes: Sequence[int] | None = None) -> Job:
        """Wait for ``nodes`` (default all) to exit; past ``timeout`` s, kill every node and fail with the logs."""
        wanted = set(self.processes if nodes is None else nodes)
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if wanted <= set(self.ended):
                return self
            if time.monotonic() > deadline:
                for node in self.nodes:
                    self.cluster.kill_node(node)
                raise AssertionError(f"nodes {sorted(wanted - set(self.ended))} still running after {timeout:.0f}s "
                                     f"(killed):\n{self.logs()}")
            time.sleep(0.05)


def start_job(cluster: Cluster, launcher: str, args: Sequence[str], nodes: Sequence[int] | None = None,
              node_extra: dict[int, dict] | None = None) -> Job:
    """Start the launcher on ``nodes`` (default: all of the cluster) with ``args`` for launch/train.py;
    ``node_extra``: more environment variables for some nodes."""
    nodes = list(range(cluster.nodes) if nodes is None else nodes)
    _port[0] += 1  # a fresh port per job: the previous job's sockets may linger in TIME_WAIT
    processes = {node: cluster.start(node, node_command(launcher, cluster, nodes, index, args, _port[0]),
                                     env=node_env(**(node_extra or {}).get(node, {})), cwd=ROOT)
                 for index, node in enumerate(nodes)}
    return Job(cluster, nodes, processes, time.monotonic())


def run_job(cluster: Cluster, launcher: str, args: Sequence[str], timeout: float = 240, **kwargs) -> Job:
    """Start and wait; every node must exit 0."""
    job = start_job(cluster, launcher, args, **kwargs).wait(timeout)
    assert all(code == 0 for code in job.codes.values()), job.logs()
    return job
