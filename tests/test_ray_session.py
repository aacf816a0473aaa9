"""Which Ray a command uses: with no `--address` and no RAY_ADDRESS raymerge starts a local Ray of
its own, even when another Ray cluster runs on the machine (Ray's default would join it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import ray
    from ray.cluster_utils import Cluster

    from raymerge.runtime.executor import ensure_ray

    from ray._private.services import find_gcs_addresses

    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        running = set(find_gcs_addresses()) | {other.address}
        ensure_ray(None)
        ours = ray.get_runtime_context().gcs_address
        print("OURS" if ours not in running else "JOINED", ours, sorted(running))
        ray.shutdown()
        ensure_ray("auto")
        print("AUTO-JOINED" if ray.get_runtime_context().gcs_address == other.address else "AUTO-ELSEWHERE")
        ray.shutdown()
    finally:
        other.shutdown()
    """
)


OWN_RAY = textwrap.dedent(
    """
    import ipaddress, json, os
    import psutil

    from raymerge.runtime.executor import LOOPBACK_ENV, ensure_ray

    def address(table, hexaddr):
        raw = bytes.fromhex(hexaddr)
        if table == "tcp":
            return ipaddress.IPv4Address(raw[::-1])
        return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))

    def listening(pids):
        inodes = {}
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:  # the process ended meanwhile (Ray ends idle workers)
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        rows = []
        for table in ("tcp", "tcp6"):
            with open(f"/proc/net/{table}") as f:
                for line in list(f)[1:]:
                    local, state, inode = line.split()[1], line.split()[3], line.split()[9]
                    if state == "0A" and inode in inodes:  # LISTEN
                        host, port = local.split(":")
                        try:
                            name = psutil.Process(inodes[inode]).name()
                        except psutil.NoSuchProcess:
                            name = "(ended)"
                        rows.append([name, str(address(table, host)), int(port, 16)])
        return rows

    ensure_ray(None, num_cpus=1)  # the first import of Ray in this process
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    token = os.path.expanduser("~/.ray/auth_token")
    mode = get_authentication_mode()
    print("AUTH", "token" if mode == AuthenticationMode.TOKEN else "other", oct(os.stat(token).st_mode & 0o777), flush=True)

    ray.get(ray.remote(lambda: 1).remote())  # a worker process too
    me = psutil.Process()
    family = [me] + me.children(recursive=True)

    def named(p, name):
        try:
            return p.name() == name
        except psutil.NoSuchProcess:
            return False

    raylet = [p for p in family if named(p, "raylet")]
    print(json.dumps({"listening": listening([p.pid for p in family]),
                      "env_left": LOOPBACK_ENV in os.environ or any(LOOPBACK_ENV in p.environ() for p in raylet)}))
    ray.shutdown()
    """
)


def start_early(config: pytest.Config) -> dict[str, Any]:
    """Start the token and loopback checks' local Ray (one, for both) when the session's tests
    are collected (`conftest`): the subprocess mostly waits for Ray's daemons and does not look
    at other Rays on the machine, so it overlaps the tests before this module's. The auto-join
    test, which does look, runs after it, in its test."""
    return _start_own_ray(config._tmp_path_factory)  # type: ignore[attr-defined]


def _start_own_ray(factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`OWN_RAY` as a user's first command runs it: a fresh home (no ~/.ray token yet: Ray
    generates one), no RAY_ADDRESS, no RAY_AUTH_MODE, no loopback switch set."""
    from conftest import Background

    home = factory.mktemp("fresh-home")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["HOME"] = str(home)
    return {"home": home, "run": Background([sys.executable, "-c", OWN_RAY], factory.mktemp("own-ray-run"), env=env, text=True)}


@pytest.fixture(scope="module")
def own_ray(tmp_path_factory) -> Any:
    """The finished `OWN_RAY` subprocess (`done`) and its home."""
    from conftest import started_early

    started = started_early(__name__) or _start_own_ray(tmp_path_factory)
    try:
        done = started["run"].result(timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        yield {"home": started["home"], "done": done}
    finally:
        started["run"].kill()


def test_a_local_ray_of_our_own_requires_a_private_token(own_ray):
    """Ray's servers listen on every interface: our local Ray requires token authentication, and
    the token file Ray generates is readable by this user only (Ray writes it 0644 by umask)."""
    done = own_ray["done"]
    assert "AUTH token 0o600" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "Token authentication is enabled for this Ray cluster" not in done.stderr  # Ray's warning: we chose it
    assert (own_ray["home"] / ".ray" / "auth_token").stat().st_mode & 0o077 == 0


def test_a_local_ray_of_our_own_listens_on_loopback_only(own_ray):
    """Every listening TCP socket of the session's processes (driver, gcs_server, raylets, workers,
    agents), read from /proc/net/tcp and tcp6, is a loopback address; before, gcs_server, the
    raylets and the core workers listened on `::` (every interface). Ray's switch is set around its
    first import only: no Ray process inherits it."""
    import ipaddress
    import json

    done = own_ray["done"]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in result["listening"]}
    assert {"gcs_server", "raylet"} <= names, result
    for name, host, port in result["listening"]:
        ip = ipaddress.ip_address(host)
        mapped = getattr(ip, "ipv4_mapped", None)
        assert ip.is_loopback or (mapped is not None and mapped.is_loopback), (name, host, port)
    assert result["env_left"] is False


def test_no_address_starts_our_own_ray_and_auto_joins_the_running_one():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.split(" ")[0] in ("OURS", "JOINED", "AUTO-JOINED", "AUTO-ELSEWHERE")]
    assert lines[0].startswith("OURS "), done.stdout
    assert lines[1] == "AUTO-JOINED", done.stdout
