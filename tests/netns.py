"""Several "nodes" on one machine: Linux network namespaces joined by a bridge, one job per node.

    reason = netns_unavailable()              # None, or why namespaces cannot be made here
    with Cluster(2, log_dir) as cluster:      # namespaces <name>-n0, -n1 (+ -hub holding the bridge)
        cluster.start(0, ["torchrun", ...])   # node 0's job, run inside its namespace
        cluster.cut(1)                        # pull node 1's cable (its switch port goes down)
        cluster.kill_node(1)                  # SIGKILL every process of node 1
        cluster.counters(0)                   # bytes node 0's eth0 sent and received
    # on exit (also after an exception or a timeout): every process in the namespaces is
    # SIGKILLed and the namespaces, with their links and bridge, are deleted.

Topology: node i is the namespace ``<name>-n<i>`` with ``lo`` up and one interface ``eth0``
holding 10.A.B.(i+1)/24; its veth peer ``n<i>`` sits on the bridge ``br0`` of ``<name>-hub``
(the switch). Processes in different namespaces reach each other only through that bridge, as
nodes do through a switch; A.B is drawn per cluster and the addresses exist only inside the
namespaces made here, so they cannot clash with the host's. Needs root and iproute2 (``ip``).
Namespaces left by a run that was itself killed (its pid is gone) are removed by the next one.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Self

PREFIX = "gora-mn"
IFACE = "eth0"
_NAME = re.compile(rf"^{PREFIX}(\d+)x\d+-(n\d+|hub)$")
_created = [0]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """None if namespaces, veth pairs and a bridge can be made here; otherwise the reason."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (`ip netns add`)"
    probe = f"{PREFIX}{os.getpid()}x0-hub"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        for args in (("link", "add", "br0", "type", "bridge"), ("link", "add", "p0", "type", "veth", "peer", "name", "p1")):
            added = _ip("-n", probe, *args, check=False)
            if added.returncode:
                return f"`ip link add ... type {args[3] if args[3] == 'bridge' else 'veth'}` failed: {added.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip()]


def _delete_namespace(name: str) -> None:
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; returns their names."""
    stale = [n for n in _namespaces() if (m := _NAME.match(n)) and not _alive(int(m.group(1)))]
    for name in stale:
        _delete_namespace(name)
    return stale


class Cluster:
    """``nodes`` namespaces on one bridge; ``start`` runs a job in one; closing tears all down."""

    def __init__(self, nodes: int, log_dir: str) -> None:
        remove_stale()
        _created[0] += 1
        self.name = f"{PREFIX}{os.getpid()}x{_created[0]}"
        self.nodes, self.log_dir = nodes, str(log_dir)
        rng = random.Random()
        self.subnet = f"10.{rng.randrange(100, 250)}.{rng.randrange(0, 256)}"
        self.processes: dict[int, list[subprocess.Popen]] = {i: [] for i in range(nodes)}
        self.closed = False
        os.makedirs(self.log_dir, exist_ok=True)
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- topology -----------------------------------------------------------------------------------

    @property
    def hub(self) -> str:
        return f"{self.name}-hub"

    def namespace(self, node: int) -> str:
        return f"{self.name}-n{node}"

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    def _build(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for node in range(self.nodes):
            ns = self.namespace(node)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", f"n{node}", "type", "veth", "peer", "name", IFACE, "netns", ns)
            _ip("-n", self.hub, "link", "set", f"n{node}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")

    # --- jobs ---------------------------------------------------------------------------------------

    def log_path(self, node: int) -> str:
        return os.path.join(self.log_dir, f"node{node}.log")

    def start(self, node: int, argv: Sequence[str], env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
        """Run ``argv`` inside node ``node``'s namespace, stdout and stderr appended to its log."""
        with open(self.log_path(node), "ab") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.namespace(node), *argv], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self.processes[node].append(process)
        return process

    def log(self, node: int) -> str:
        try:
            with open(self.log_path(node), errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def pids(self, node: int) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.namespace(node), check=False).stdout.split()]

    # --- faults -------------------------------------------------------------------------------------

    def kill_node(self, node: int) -> None:
        """SIGKILL every process in node ``node`` (its kernel then closes their sockets)."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cut(self, node: int) -> None:
        """Take node ``node``'s switch port down: its eth0 loses carrier and nothing more passes."""
        _ip("-n", self.hub, "link", "set", f"n{node}", "down")

    def counters(self, node: int) -> dict[str, int]:
        """{"tx": bytes, "rx": bytes} of node ``node``'s eth0 (the kernel's interface counters, the
        ones /sys/class/net/eth0/statistics shows inside the namespace)."""
        shown = json.loads(_ip("-n", self.namespace(node), "-s", "-j", "link", "show", "dev", IFACE).stdout)[0]
        return {"tx": shown["stats64"]["tx"]["bytes"], "rx": shown["stats64"]["rx"]["bytes"]}

    # --- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the namespaces, reap ours, delete the namespaces. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for node in range(self.nodes):
            if self.namespace(node) in _namespaces():
                self.kill_node(node)
        for processes in self.processes.values():
            for process in processes:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for node in range(self.nodes):
            _delete_namespace(self.namespace(node))
        _delete_namespace(self.hub)  # deleting the namespaces removes their veth ends and the bridge

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
