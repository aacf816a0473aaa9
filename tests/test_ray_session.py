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


AUTH_SCRIPT = textwrap.dedent(
    """
    import os, stat
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from raymerge.runtime.executor import ensure_ray

    ensure_ray(None, num_cpus=1)
    mode = get_authentication_mode()
    token = os.path.expanduser("~/.ray/auth_token")
    print("AUTH", "token" if mode == AuthenticationMode.TOKEN else "other", oct(os.stat(token).st_mode & 0o777))
    ray.shutdown()
    """
)


def start_early(config: pytest.Config) -> dict[str, Any]:
    """Start the token and loopback checks' local Rays when the session's tests are collected
    (`conftest`): each subprocess mostly waits for Ray's daemons, and neither looks at other Rays
    on the machine, so they overlap the tests before this module's and each other. The auto-join
    test, which does look, runs after them, in its test."""
    return _start_own_rays(config._tmp_path_factory)  # type: ignore[attr-defined]


def _start_own_rays(factory: pytest.TempPathFactory) -> dict[str, Any]:
    from conftest import Background

    home = factory.mktemp("fresh-home")  # a fresh ~/.ray: no token yet, Ray generates one
    auth_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    auth_env["HOME"] = str(home)
    listen_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    listen_env["RAY_AUTH_MODE"] = "disabled"
    return {
        "home": home,
        "auth": Background([sys.executable, "-c", AUTH_SCRIPT], factory.mktemp("auth-run"), env=auth_env, text=True),
        "listening": Background([sys.executable, "-c", LISTENING], factory.mktemp("listening-run"), env=listen_env, text=True),
    }


@pytest.fixture(scope="module")
def own_rays(tmp_path_factory) -> Any:
    from conftest import started_early

    runs = started_early(__name__) or _start_own_rays(tmp_path_factory)
    yield runs
    for name in ("auth", "listening"):
        runs[name].kill()


def test_a_local_ray_of_our_own_requires_a_private_token(own_rays):
    """Ray's servers listen on every interface: our local Ray requires token authentication, and
    the token file Ray generates is readable by this user only (Ray writes it 0644 by umask)."""
    done = own_rays["auth"].result(timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AUTH token 0o600" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "Token authentication is enabled for this Ray cluster" not in done.stderr  # Ray's warning: we chose it
    assert (own_rays["home"] / ".ray" / "auth_token").stat().st_mode & 0o077 == 0


LISTENING = textwrap.dedent(
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


def test_a_local_ray_of_our_own_listens_on_loopback_only(own_rays):
    """Every listening TCP socket of the session's processes (driver, gcs_server, raylets, workers,
    agents), read from /proc/net/tcp and tcp6, is a loopback address; before, gcs_server, the
    raylets and the core workers listened on `::` (every interface). Ray's switch is set around its
    first import only: no Ray process inherits it."""
    import ipaddress
    import json

    done = own_rays["listening"].result(timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
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
