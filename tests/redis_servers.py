"""Real Redis topologies on loopback for the scale-out tests: a 3-master Cluster, a master with a
replica watched by a Sentinel. Each test module starts what it needs once (module-scoped).

Ports: REDIS_CLUSTER_PORT (first of three, default 7101; the cluster bus uses port + 10000),
REDIS_SENTINEL_DATA_PORT (master, then replica; default 7111), REDIS_SENTINEL_PORT (default 26401).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def need_redis_tools() -> None:
    """Skip the calling module where redis-server or redis-cli is missing (CI has both)."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are needed for the Cluster and Sentinel tests", allow_module_level=True)


def cli(port: int, *args: str, timeout: float = 5.0) -> str:
    """Run one redis-cli command against a loopback port; its output as text."""
    assert REDIS_CLI is not None
    done = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                          timeout=timeout, text=True)
    return done.stdout.strip()


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, and maybe wanting a password
    return False


def wait_for(check, within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Servers:
    """redis-server processes this test module started, stopped with it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, *args: str, config: str | None = None) -> None:
        assert REDIS_SERVER is not None
        if _answers(port):
            raise RuntimeError(f"port {port} is taken by another Redis; set the REDIS_*_PORT variables")
        command = [REDIS_SERVER]
        if config is not None:
            path = self.directory / f"{port}.conf"
            path.write_text(config)
            command.append(str(path))
        command += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(self.directory), *args]
        self.processes[port] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _answers(port), 5.0, f"redis on port {port}")

    def stop(self, port: int) -> None:
        process = self.processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait(5)

    def stop_all(self) -> None:
        for port in list(self.processes):
            self.stop(port)


class Cluster:
    """Three masters, no replicas, every slot covered."""

    def __init__(self, servers: Servers, first_port: int) -> None:
        self.servers = servers
        self.ports = [first_port, first_port + 1, first_port + 2]
        self.url = f"redis://127.0.0.1:{first_port}"

    def start(self) -> None:
        for port in self.ports:
            self.servers.start(port, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                               "--cluster-node-timeout", "2000")
        assert REDIS_CLI is not None
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, timeout=30, check=True)
        wait_for(lambda: all("cluster_state:ok" in cli(p, "cluster", "info") for p in self.ports), 15.0,
                 "the cluster to cover every slot")

    def keys(self, port: int, pattern: str) -> list[str]:
        """The keys one master holds that match `pattern`."""
        out = cli(port, "--scan", "--pattern", pattern)
        return [line for line in out.splitlines() if line]


class SentinelSet:
    """A master and its replica, watched by one Sentinel as `mymaster` (quorum 1, 1 s down-after);
    with `sentinel_password`, the Sentinel wants that password (`requirepass`), the data nodes none."""

    service = "mymaster"

    def __init__(self, servers: Servers, data_port: int, sentinel_port: int, sentinel_password: str = "") -> None:
        self.servers = servers
        self.master_port, self.replica_port = data_port, data_port + 1
        self.sentinel_port = sentinel_port
        self.sentinel_password = sentinel_password

    def start(self) -> None:
        self.servers.start(self.master_port, "--repl-diskless-sync-delay", "0")
        self.servers.start(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        config = (f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
                  f"sentinel down-after-milliseconds {self.service} 1000\n"
                  f"sentinel failover-timeout {self.service} 5000\n")
        if self.sentinel_password:
            config += f"requirepass {self.sentinel_password}\n"
        self.servers.start(self.sentinel_port, "--sentinel", config=config)
        wait_for(lambda: "master_link_status:up" in cli(self.replica_port, "info", "replication"), 10.0,
                 "the replica to sync")
        wait_for(lambda: "slaves=1" in self.ask("info", "sentinel"), 10.0, "the Sentinel to see the replica")

    def ask(self, *args: str) -> str:
        """A redis-cli command to the Sentinel, with its password when it has one."""
        auth = ("--no-auth-warning", "-a", self.sentinel_password) if self.sentinel_password else ()
        return cli(self.sentinel_port, *auth, *args)

    def master(self) -> int:
        """The port the Sentinel names as master now."""
        out = self.ask("sentinel", "get-master-addr-by-name", self.service).splitlines()
        return int(out[1]) if len(out) == 2 else -1


def port_from_env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
