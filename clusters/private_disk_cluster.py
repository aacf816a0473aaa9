"""A multi-node Ray cluster on one machine whose worker nodes have private disks.

    python clusters/private_disk_cluster.py start [--workers 2] [--state FILE]
    python clusters/private_disk_cluster.py stop  [--state FILE]

What it starts (Linux, as root or with unprivileged user namespaces allowed for `unshare`):

- a Ray head (`ray start --head`, 127.0.0.1, 0 CPUs: nothing runs there but the GCS and the
  driver's raylet), in a mount namespace of its own (only to find its processes again);
- N worker nodes (`ray start --address`, node IPs 127.0.0.2, 127.0.0.3, ... so the driver never
  mistakes one for its local node), each in its own mount namespace
  (`unshare --mount --propagation private`) with a private tmpfs mounted over a folder of its own
  (`<root>/<node>`, empty as the host and the other nodes see it): the node's
  temp dir (`TMPDIR`), its Ray temp dir (`--temp-dir`), its Hugging Face cache (`HF_HOME`) and
  raymerge's staging dir (`RAYMERGE_STAGING_DIR`) all live there; the host folders in `hidden`
  (the driver's data, e.g. pytest's temp folder) are covered by an empty tmpfs, so the node
  cannot read them. Installed software stays visible, as on a real cluster's shared image. Each node declares
  `--num-cpus 1` (by default) and a custom resource naming it (`{"node_a": 1}`, `{"node_b": 1}`, ...).

Shared storage is whatever you give the nodes: an S3 endpoint (the tests use moto's server on
127.0.0.1) through the environment (`env=`: AWS credentials; raymerge sends the endpoint itself).
Token authentication is disabled (`RAY_AUTH_MODE=disabled`): every server listens on the
machine's interfaces, so use this on a machine you trust (a laptop, CI), not a shared host.

Stopping kills exactly the processes of these nodes: every process whose mount namespace is one
of the namespaces created here (a node's processes all inherit it, whatever process group or
session Ray puts them in), found by comparing `/proc/PID/ns/mnt`; never `ray stop`, which kills
every Ray on the machine. A node's tmpfs goes with its namespace's last process. The state
(namespaces, PIDs, address) is written as JSON to `--state` (default
`/tmp/raymerge-private-cluster.json`), so `stop` works from another shell.

From Python (what `tests/test_private_disk_cluster.py` does):

    from clusters.private_disk_cluster import PrivateDiskCluster
    cluster = PrivateDiskCluster(workers=2, env={...}).start()   # cluster.address: "127.0.0.1:PORT"
    ...
    cluster.stop()
    cluster.stop_node("node_b")    # kill one worker node (its raylet and every process of it)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_STATE = "/tmp/raymerge-private-cluster.json"
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB; tiny models need no more


class ClusterError(RuntimeError):
    pass


def namespaces_unavailable() -> Optional[str]:
    """Why private mount namespaces cannot be made here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return "private disks need Linux mount namespaces"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    if shutil.which("ray") is None:
        return "the `ray` command is not on PATH"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"cannot create a mount namespace with a private tmpfs ({why})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mnt_ns(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in(namespace: str) -> list[int]:
    """Every process whose mount namespace is `namespace` (e.g. 'mnt:[4026532400]')."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _mnt_ns(int(entry)) == namespace:
            found.append(int(entry))
    return found


@dataclass
class Node:
    name: str  # "head", "node_a", ...
    ip: str
    pid: int  # the `unshare` process (it execs the shell that execs `ray start --block`)
    namespace: str  # its mount namespace, 'mnt:[...]'
    temp_dir: str  # Ray's --temp-dir (inside the private tmpfs for worker nodes)
    log: str  # where `ray start` writes its output (on the host)


@dataclass
class PrivateDiskCluster:
    """Head + `workers` private-disk worker nodes on this machine (module docstring)."""

    workers: int = 2
    cpus_per_node: int = 1
    env: dict = field(default_factory=dict)  # extra environment of every node (e.g. AWS credentials)
    root: Optional[str] = None  # host folder for the head's temp dir and the logs (default: a new one)
    port: int = 0
    nodes: list = field(default_factory=list)
    tmpfs_size: str = "512m"
    # Host folders each worker node must not see (an empty tmpfs is mounted over each in its
    # namespace): the driver's data, e.g. pytest's temp folder. Software stays visible (the
    # nodes of a real cluster share an image, not a disk).
    hidden: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def worker_names(self) -> list[str]:
        return [f"node_{chr(ord('a') + i)}" for i in range(self.workers)]

    # -- start ------------------------------------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update(self.env)
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
                   PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        # A node that dies is noticed within ~2 s rather than Ray's default ~30 s.
        env.update(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                   RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
        return env

    def _spawn(self, name: str, ip: str, script: str, env: dict, temp_dir: str) -> Node:
        log = os.path.join(self.root, f"{name}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        for _ in range(200):  # the namespace exists once unshare has exec'd the shell
            ns = _mnt_ns(proc.pid)
            if ns is not None and ns != _mnt_ns(os.getpid()):
                break
            time.sleep(0.01)
        else:
            proc.kill()
            raise ClusterError(f"{name}: unshare did not start ({self._tail(log)})")
        node = Node(name, ip, proc.pid, ns, temp_dir, log)
        self.nodes.append(node)
        return node

    @staticmethod
    def _tail(path: str, lines: int = 5) -> str:
        try:
            return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "no log"

    def start(self, timeout: float = 60.0) -> "PrivateDiskCluster":
        why = namespaces_unavailable()
        if why is not None:
            raise ClusterError(why)
        self.root = self.root or tempfile.mkdtemp(prefix="rmc-", dir="/tmp")
        self.port = self.port or _free_port()
        env = self._env()
        common = (f"--num-cpus {{cpus}} --object-store-memory {OBJECT_STORE_BYTES} --disable-usage-stats "
                  f"--block")
        head_tmp = os.path.join(self.root, "h")
        try:
            self._spawn("head", "127.0.0.1", (
                f"exec ray start --head --node-ip-address 127.0.0.1 --port {self.port} --include-dashboard false "
                f"--dashboard-agent-listen-port {_free_port()} --temp-dir {head_tmp} "
                + common.format(cpus=0)), env, head_tmp)
            self._wait_for_gcs(timeout)
            for i, name in enumerate(self.worker_names):
                self._start_worker(i, name, env)
            self.wait_for_nodes(1 + self.workers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_worker(self, i: int, name: str, env: dict) -> Node:
        # The private tmpfs goes over a folder of this node's own (empty on the host), not over
        # /tmp: the host's /tmp may hold what every node needs (a checkout of raymerge installed
        # in editable mode, a virtualenv), and a private mount of it would hide that.
        private = os.path.join(self.root, name)
        os.makedirs(private, exist_ok=True)
        node_env = dict(env, TMPDIR=f"{private}/t", HF_HOME=f"{private}/hf", RAYMERGE_STAGING_DIR=f"{private}/staging")
        # (writable and as large as the private one: a worker writing at a driver path, e.g. its
        # own copy of the staging folder, writes to its own disk)
        hide = "".join(f"mount -t tmpfs -o size={self.tmpfs_size},mode=1777 tmpfs {h} && " for h in self.hidden if os.path.isdir(h))
        script = (
            hide + f"mount -t tmpfs -o size={self.tmpfs_size},mode=1777 tmpfs {private} "
            f"&& mkdir -p {private}/t {private}/hf {private}/staging "
            f"&& exec ray start --address {self.address} --node-ip-address 127.0.0.{i + 2} --temp-dir {private}/r "
            f"--resources '{json.dumps({name: 1})}' --dashboard-agent-listen-port {_free_port()} "
            f"--num-cpus {self.cpus_per_node} --object-store-memory {OBJECT_STORE_BYTES} --disable-usage-stats --block")
        return self._spawn(name, f"127.0.0.{i + 2}", script, node_env, f"{private}/r")

    def restart_node(self, name: str, timeout: float = 60.0) -> None:
        """Start worker node `name` again (after `stop_node`), with a fresh private tmpfs."""
        old = self.node(name)
        self._kill_namespace(old)
        self.nodes.remove(old)
        # The GCS lists a killed node as alive until it has missed enough heartbeats (tens of
        # seconds): wait for a node at its address with an id not listed before the restart,
        # not for one more alive node, which may never come once the old one is marked dead.
        stale = {nid for nid, ip in self._alive_ids().items() if ip == old.ip}
        self._start_worker(self.worker_names.index(name), name, self._env())
        self._wait(lambda alive: any(ip == old.ip and nid not in stale for nid, ip in alive.items()),
                   f"{name} ({old.ip}) came back", timeout)

    def _gcs(self):
        from ray._raylet import GcsClient

        return GcsClient(address=self.address)

    def _wait_for_gcs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head = self.nodes[0]
            if not _pids_in(head.namespace):
                raise ClusterError(f"the Ray head exited: {self._tail(head.log)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise ClusterError(f"the Ray head did not listen on {self.address} within {timeout:.0f} s: {self._tail(self.nodes[0].log)}")

    def _alive_ids(self) -> dict[str, str]:
        """node id -> node IP of the alive nodes, as the GCS sees them."""
        infos = self._gcs().get_all_node_info(timeout=5)
        return {node_id.hex(): info.node_manager_address for node_id, info in infos.items() if info.state == 0}

    def alive_nodes(self) -> dict[str, str]:
        """node IP -> node id of the alive nodes, as the GCS sees them."""
        return {ip: nid for nid, ip in self._alive_ids().items()}

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> None:
        self._wait(lambda alive: len(alive) >= count, f"{count} Ray nodes came up", timeout)

    def _wait(self, done, what: str, timeout: float) -> None:
        """Until `done(node id -> IP of the alive nodes)`; a node whose processes all exited, or
        the timeout, raises `ClusterError`."""
        deadline = time.monotonic() + timeout
        seen: dict = {}
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not _pids_in(node.namespace):
                    raise ClusterError(f"{node.name} exited: {self._tail(node.log)}")
            try:
                seen = self._alive_ids()
            except Exception:  # noqa: BLE001 - the GCS is still starting
                seen = {}
            if done(seen):
                return
            time.sleep(0.2)
        raise ClusterError(f"not within {timeout:.0f} s: {what} (alive: {len(seen)} Ray node(s))")

    # -- stop -------------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @staticmethod
    def _kill_namespace(node: Node, grace: float = 1.0) -> None:
        """SIGTERM then SIGKILL every process in `node`'s mount namespace (and only those)."""
        steps = ((signal.SIGKILL, 5.0),) if grace <= 0 else ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0))
        for sig, wait in steps:
            pids = _pids_in(node.namespace)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _pids_in(node.namespace):
                time.sleep(0.05)
        try:
            os.waitpid(node.pid, os.WNOHANG)  # reap our own child, if it is one
        except ChildProcessError:
            pass

    def stop_node(self, name: str, hard: bool = True) -> None:
        """Kill one node: every process of it at once (SIGKILL: a node lost, as a machine that
        dies), or SIGTERM first (`hard=False`). Its private tmpfs goes with them."""
        node = self.node(name)
        self._kill_namespace(node, grace=0.0 if hard else 3.0)

    def stop(self) -> None:
        """Kill every node's processes (workers first), remove the host folder."""
        for node in reversed(self.nodes):
            self._kill_namespace(node)
        if self.root and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)
        self.nodes = []

    # -- state file (CLI) -------------------------------------------------------------------------

    def save(self, path: str) -> None:
        data = {"port": self.port, "root": self.root, "workers": self.workers, "nodes": [asdict(n) for n in self.nodes]}
        Path(path).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str) -> "PrivateDiskCluster":
        data = json.loads(Path(path).read_text())
        return cls(workers=data["workers"], root=data["root"], port=data["port"], nodes=[Node(**n) for n in data["nodes"]])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each worker node declares (default 1)")
    parser.add_argument("--state", default=DEFAULT_STATE, help=f"state file (default {DEFAULT_STATE})")
    args = parser.parse_args(argv)
    if args.command == "start":
        if os.path.exists(args.state):
            print(f"{args.state} exists: a cluster may be running; stop it first", file=sys.stderr)
            return 1
        try:
            cluster = PrivateDiskCluster(workers=args.workers, cpus_per_node=args.cpus).start()
        except ClusterError as err:
            print(f"private_disk_cluster: {err}", file=sys.stderr)
            return 1
        cluster.save(args.state)
        names = ", ".join(f"{n.name} ({n.ip})" for n in cluster.nodes[1:])
        print(f"Ray head at {cluster.address}; worker nodes with private /tmp: {names}")
        print(f"  RAY_AUTH_MODE=disabled raymerge merge CONFIG s3://bucket/out --address {cluster.address}")
        print(f"  python {sys.argv[0]} stop   # state in {args.state}")
        return 0
    if not os.path.exists(args.state):
        print(f"no state file {args.state}: nothing to stop", file=sys.stderr)
        return 1
    PrivateDiskCluster.load(args.state).stop()
    os.unlink(args.state)
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
