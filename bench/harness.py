"""The benchmark run: start everything on 127.0.0.1, measure, stop everything, write the report.

Speed (closed loop, wrk or the Python generator): our proxy's memory and Redis HITs against a
bare aiohttp server (the Python ceiling), pass-through against a minimal aiohttp proxy, added
latency over a 20 ms provider, RSS; nginx measured in the same run for every figure.
Resilience (open loop, fixed rate; bench/faults.py): faults switched on fake providers, our proxy
with only upstreams, a timeout and TTLs against a tuned nginx, column by column.

Every case runs `rounds` times, interleaved (case A, B, C, A, B, C, ...); medians are quoted
with min–max. The latency cases run `latency_rounds` times (5 by default): one 5 s run's p50
at c=10 over the 20 ms provider varies far more from run to run than a throughput figure does
(one build, one bench run: +0.18 to +0.76 ms added, while the fake still timed its 20 ms with
libuv's millisecond timers; see bench.servers.PreciseTimer). The proxy-side processes are pinned to
one core and the load generator and the fake providers to the other when `taskset` is there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from string import Template
from typing import Any

import yaml

from bench import cluster as cluster_bench
from bench import faults as fault_bench
from bench.faults import KEYS, PROXIES, SCENARIOS, Scenario
from bench.loadgen import parse_wrk, wrk_command

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
HIT_PATH = "/hit/latest/USD"
PASS_PATH = "/pass/latest/USD"
SLOW_PATH = "/pass/slow"
THROUGHPUT_CASES = ("ceiling", "ours_memory_hit", "ours_redis_hit", *cluster_bench.CASES, "nginx_hit", "minimal_pass",
                    "ours_pass", "nginx_pass")
LATENCY_CASES = ("direct", "ours", "minimal", "nginx")


# --- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Every process the run starts, so every one is stopped at the end (also on Ctrl-C)."""

    def __init__(self, logdir: Path, pin: bool) -> None:
        self.logdir = logdir
        self.pin = pin
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.commands: list[str] = []

    def cpu(self, cpu: str | None) -> list[str]:
        return ["taskset", "-c", cpu] if self.pin and cpu is not None else []

    def start(self, name: str, argv: list[str], cpu: str | None = None, env: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        command = self.cpu(cpu) + argv
        self.commands.append(_shell(command, env))
        log = open(self.logdir / f"{name}.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its own session: nginx workers go with it
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.running = [(n, p) for n, p in self.running if p is not process]

    def stop_all(self) -> None:
        for _, process in reversed(list(self.running)):
            self.stop(process)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _shell(command: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    text = " ".join(shlex.quote(part) for part in command)
    return f"{prefix} {text}".strip().replace(str(ROOT) + "/", "")


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


def http(method: str, url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers={"Accept-Encoding": "identity"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def rss_kib(pid: int) -> int:
    """VmRSS of a process and of its children (nginx: master + worker), in KiB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for one in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def hold_connections(port: int, path: str, count: int) -> list[asyncio.StreamWriter]:
    """Open `count` keep-alive connections, complete one request on each, and keep them open."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 100):
        writers += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return writers


# --- tools --------------------------------------------------------------------------------------

def ensure_tool(binary: str, packages: list[str], install: bool, notes: list[str]) -> str | None:
    """The tool's path; installed with apt-get when allowed and running as root."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if found:
        return found
    hint = f"apt-get install -y {packages[0]}"
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing {binary} ({hint})", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        for package in packages:
            done = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, capture_output=True,
                                  timeout=600)
            if done.returncode == 0:
                break
        found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
        if found:
            return found
    notes.append(f"{binary} is not installed ({hint} as root to include it)")
    return None


def tool_version(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else None
    return None


def machine() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    import aiohttp

    try:
        import uvloop
        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": memory, "kernel": platform.release(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__, "uvloop": uvloop_version,
            "idle": idle_policy()}


def idle_policy() -> str | None:
    """How an idle core sleeps: the latency figures depend on it (see docs/architecture.md, "Why our own front end and client").

    On a virtual machine whose idle cores halt at once (haltpoll with guest_halt_poll_ns 0),
    every write that wakes a process on the other core pays for waking that core.
    """
    def read(path: str) -> str | None:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
        return None

    driver = read("/sys/devices/system/cpu/cpuidle/current_driver")
    if driver is None:
        return None
    governor = read("/sys/devices/system/cpu/cpuidle/current_governor") or read(
        "/sys/devices/system/cpu/cpuidle/current_governor_ro")
    text = f"cpuidle {driver}" + (f"/{governor}" if governor and governor != driver else "")
    poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return text + (f", guest_halt_poll_ns {poll}" if poll is not None else "")


# --- configs --------------------------------------------------------------------------------------

def proxy_config(services: dict[str, Any], cache: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None) -> str:
    """A route table; sections left out (None) are left to the proxy's defaults."""
    document: dict[str, Any] = {"version": 1, "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}}
    if cache is not None:
        document["cache"] = cache
    if defaults is not None:
        document["defaults"] = defaults
    document["services"] = services
    return yaml.safe_dump(document, sort_keys=False)


def _upstreams(short: str, primary: int, secondary: int) -> list[dict[str, Any]]:
    return [{"name": f"{short}_primary", "url": f"http://127.0.0.1:{primary}"},
            {"name": f"{short}_secondary", "url": f"http://127.0.0.1:{secondary}"}]


SPEED_DEFAULTS = {"timeout": "5s", "deadline": "15s", "breaker": "STANDARD", "retry": "DEFAULT"}


def speed_services(a: int, b: int) -> dict[str, Any]:
    return {"hit": {"prefix": "/hit", "cache": {"ttl": "24h", "stale": "7d"}, "upstreams": _upstreams("hit", a, b)},
            "pass": {"prefix": "/pass", "upstreams": _upstreams("pass", a, b)}}


def nginx_config(tmp: Path, port: int, speed: tuple[int, int], scenarios: dict[str, tuple[int, int]]) -> str:
    upstreams, locations = fault_bench.nginx_parts(scenarios)
    upstreams.insert(0, f"    upstream speed {{\n        server 127.0.0.1:{speed[0]};\n"
                        f"        server 127.0.0.1:{speed[1]} backup;\n        keepalive 64;\n    }}")
    locations[:0] = ["        location /hit/ {\n            proxy_pass http://speed/;\n            proxy_cache bench;\n"
                     "            proxy_cache_valid 200 24h;\n            add_header X-Cache $upstream_cache_status;\n"
                     "        }",
                     "        location /pass/ {\n            proxy_pass http://speed/;\n        }"]
    template = Template((BENCH / "nginx.conf.tmpl").read_text())
    return template.safe_substitute(
        user="user root;" if os.geteuid() == 0 else "", tmp=str(tmp), port=str(port), timeout="1s", deadline="5s",
        upstreams="\n".join(upstreams), locations="\n".join(locations))


# --- the run ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.duration = args.duration or (1.0 if self.smoke else 5.0)
        self.rounds = args.rounds or (1 if self.smoke else 3)
        self.latency_rounds = args.latency_rounds or (1 if self.smoke else 5)
        self.scenario_seconds = args.scenario_seconds or (1.0 if self.smoke else 15.0)
        self.fault_rounds = args.fault_rounds or (1 if self.smoke else 5)
        self.rate = args.rate
        self.notes: list[str] = []
        self.work = Path(tempfile.mkdtemp(prefix="rp-bench-"))
        pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2 and not args.no_pin
        if not pin:
            self.notes.append("processes are not pinned to cores (taskset missing, one core, or --no-pin)")
        self.procs = Processes(self.work, pin)
        self.subject_cpu, self.load_cpu = ("1", "0") if pin else (None, None)
        install = not self.smoke and not args.no_install
        self.wrk = None if args.loadgen == "python" else ensure_tool("wrk", ["wrk"], install, self.notes)
        if args.loadgen == "wrk" and self.wrk is None:
            raise SystemExit("bench: --loadgen wrk but wrk is not installed")
        if self.wrk is None:
            self.notes.append("load from the Python generator (bench/loadgen.py): its own ceiling is lower than wrk's")
        self.nginx = None if args.skip_nginx else ensure_tool("nginx", ["nginx-light", "nginx"], install, self.notes)
        if self.nginx is None and args.skip_nginx:
            self.notes.append("nginx left out (--skip-nginx)")
        if self.nginx is None:
            print("bench: nginx parts skipped" + ("" if args.skip_nginx else " (nginx is not installed)"), flush=True)
        self.redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.redis_prefix = f"rp-bench:{uuid.uuid4().hex[:10]}:"
        self.redis_server = shutil.which("redis-server")
        self.redis_cli = shutil.which("redis-cli")
        self.ports: dict[str, int] = {}
        self.proc: dict[str, subprocess.Popen[bytes]] = {}
        self.results: dict[str, Any] = {}

    # --- helpers ---

    def port(self, name: str) -> int:
        if name not in self.ports:
            taken = set(self.ports.values())
            port = free_port()
            while port in taken:  # the kernel may hand a closed port out again: one listener per port
                port = free_port()
            self.ports[name] = port
        return self.ports[name]

    def load(self, url: str, connections: int, duration: float) -> dict[str, Any]:
        if self.wrk:
            command = self.procs.cpu(self.load_cpu) + wrk_command(url, connections, duration)
            done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
            if done.returncode != 0:
                raise RuntimeError(f"wrk failed: {done.stderr.strip()}")
            return parse_wrk(done.stdout)
        command = self.procs.cpu(self.load_cpu) + [PYTHON, "-m", "bench.loadgen", "closed", "--url", url,
                                                   "-c", str(connections), "-d", str(duration)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"python load generator failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def launch_proxy(self, name: str, text: str, env: dict[str, str] | None = None) -> str:
        """Start our proxy on a route table; `wait_ready` before using the URL it returns."""
        path = self.work / f"{name}.yaml"
        path.write_text(text)
        listen, metrics = self.port(name), self.port(name + "_metrics")
        self.proc[name] = self.procs.start(name, [PYTHON, "-m", "proxy", "run", "--config", str(path),
                                                  "--listen", f"127.0.0.1:{listen}", "--metrics-listen",
                                                  f"127.0.0.1:{metrics}"],
                                           cpu=self.subject_cpu, env={"LOG_LEVEL": "warning", **(env or {})})
        return f"http://127.0.0.1:{listen}"

    def wait_ready(self, name: str) -> None:
        try:
            wait_http(f"http://127.0.0.1:{self.port(name)}/health/ready", self.proc[name])
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}\n{self.procs.log_tail(name)}") from None

    def start_proxy(self, name: str, text: str, env: dict[str, str] | None = None) -> str:
        url = self.launch_proxy(name, text, env)
        self.wait_ready(name)
        return url

    def redis_answers(self, url: str) -> bool:
        import redis

        try:
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            ok = bool(client.ping())
            client.close()
            return ok
        except Exception:
            return False

    def calls(self, port: int) -> int:
        _, _, body = http("GET", f"http://127.0.0.1:{port}/__bench/calls")
        return int(json.loads(body)["calls"])

    def mode(self, port: int, mode: str) -> None:
        status, _, body = http("POST", f"http://127.0.0.1:{port}/__bench/mode/{mode}")
        if status != 200:
            raise RuntimeError(f"fake provider on {port}: {body!r}")

    # --- set-up ---

    def start_all(self) -> None:
        proxies = ["defaults"] + (["nginx"] if self.nginx else [])
        listeners = ["speed_a", "speed_b"]
        for who in proxies:
            for scenario in SCENARIOS:
                if scenario.redis and who == "nginx":
                    continue
                if scenario.primary != "refuse":
                    listeners.append(f"{who}_{scenario.short}_p")
                listeners.append(f"{who}_{scenario.short}_s")
        fakes = self.procs.start("fakes", [PYTHON, "-m", "bench.servers", "upstreams"] +
                                 [f"{name}={self.port(name)}" for name in listeners], cpu=self.load_cpu)
        for name in listeners:
            try:
                wait_http(f"http://127.0.0.1:{self.port(name)}/__bench/calls", fakes)
            except RuntimeError as exc:
                raise RuntimeError(f"fake providers: {exc}\n{self.procs.log_tail('fakes')}") from None
        a, b = self.port("speed_a"), self.port("speed_b")

        # Started together, then waited for: each Python process takes about a second to import.
        hello = self.procs.start("hello", [PYTHON, "-m", "bench.servers", "hello", "--port", str(self.port("hello"))],
                                 cpu=self.subject_cpu)
        minimal = self.procs.start("minimal", [PYTHON, "-m", "bench.servers", "minproxy", "--port",
                                               str(self.port("minimal")), "--upstream", f"http://127.0.0.1:{a}"],
                                   cpu=self.subject_cpu)
        self.launch_proxy("ours_memory", proxy_config(speed_services(a, b), {"backend": "memory"}, SPEED_DEFAULTS))
        if self.redis_answers(self.redis_url):
            self.launch_proxy("ours_redis", proxy_config(
                speed_services(a, b), {"backend": "redis", "url": self.redis_url, "prefix": self.redis_prefix},
                SPEED_DEFAULTS))
        else:
            self.notes.append(f"no Redis answers at {self.redis_url}: the Redis-backed HIT case is skipped")
        cluster_url = None
        if self.args.skip_cluster or not (self.redis_server and self.redis_cli):
            self.notes.append("Redis Cluster cases left out (" + ("--skip-cluster" if self.args.skip_cluster else
                                                                   "redis-server or redis-cli missing") + ")")
        else:
            cluster_url = cluster_bench.start(self.procs, self.port, self.redis_server, self.redis_cli, self.load_cpu)
        single_url = self.redis_url if "ours_redis" in self.proc else None
        for name, cache in cluster_bench.caches(single_url, cluster_url, self.redis_prefix).items():
            self.launch_proxy(name, proxy_config(speed_services(a, b), cache, SPEED_DEFAULTS))
        services = {name: fault_bench.defaults_service(scenario, name, *self.fault_ports("defaults", scenario))
                    for scenario, name in self.fault_services()}
        self.launch_proxy("defaults", proxy_config(services))  # the route table most users write: nothing else
        wait_http(f"http://127.0.0.1:{self.port('hello')}/", hello)
        wait_http(f"http://127.0.0.1:{self.port('minimal')}{PASS_PATH}", minimal)
        for name in ("ours_memory", "ours_redis", *(case[:-4] for case in cluster_bench.CASES), "defaults"):
            if name in self.proc:
                self.wait_ready(name)

        if self.nginx:
            tmp = self.work / "nginx"
            tmp.mkdir()
            servers = {name: (scenario, *self.fault_ports("nginx", scenario)) for scenario, name in self.fault_services()}
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_config(tmp, self.port("nginx"), (a, b), servers))
            process = self.procs.start("nginx", [self.nginx, "-p", str(tmp), "-c", str(conf)], cpu=self.subject_cpu)
            self.proc["nginx"] = process
            try:
                wait_http(f"http://127.0.0.1:{self.port('nginx')}{PASS_PATH}", process)
            except RuntimeError as exc:
                error_log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
                raise RuntimeError(f"nginx did not start: {exc}\n{self.procs.log_tail('nginx')}\n{error_log}") from None

    def fault_services(self) -> list[tuple[Scenario, str]]:
        """(scenario, service name) of every round the long-running proxies serve (Redis's proxy is per run)."""
        return [(scenario, fault_bench.service_name(scenario, number)) for scenario in SCENARIOS if not scenario.redis
                for number in range(1, self.fault_rounds + 1)]

    def fault_ports(self, who: str, scenario: Scenario) -> tuple[int, int]:
        """The primary's and secondary's ports of one proxy's fakes (a refusing primary: a port nobody listens on)."""
        primary = self.port(f"refused_{who}") if scenario.primary == "refuse" else self.port(f"{who}_{scenario.short}_p")
        return primary, self.port(f"{who}_{scenario.short}_s")

    def urls(self) -> dict[str, str]:
        ours = f"http://127.0.0.1:{self.port('ours_memory')}"
        nginx = f"http://127.0.0.1:{self.port('nginx')}"
        urls = {"ceiling": f"http://127.0.0.1:{self.port('hello')}/",
                "ours_memory_hit": ours + HIT_PATH,
                "minimal_pass": f"http://127.0.0.1:{self.port('minimal')}{PASS_PATH}",
                "ours_pass": ours + PASS_PATH}
        for case in ("ours_redis_hit", *cluster_bench.CASES):
            if case[:-4] in self.proc:
                urls[case] = f"http://127.0.0.1:{self.port(case[:-4])}{HIT_PATH}"
        if self.nginx:
            urls["nginx_hit"] = nginx + HIT_PATH
            urls["nginx_pass"] = nginx + PASS_PATH
        return urls

    def latency_urls(self) -> dict[str, str]:
        urls = {"direct": f"http://127.0.0.1:{self.port('speed_a')}/slow",
                "ours": f"http://127.0.0.1:{self.port('ours_memory')}{SLOW_PATH}",
                "minimal": f"http://127.0.0.1:{self.port('minimal')}{SLOW_PATH}"}
        if self.nginx:
            urls["nginx"] = f"http://127.0.0.1:{self.port('nginx')}{SLOW_PATH}"
        return urls

    def check_headers(self) -> dict[str, Any]:
        """What each case really exercises: X-Cache of a request made just before the runs."""
        seen = {}
        for case, url in self.urls().items():
            http("GET", url)  # the first answer fills the caches
            status, headers, _ = http("GET", url)
            seen[case] = {"status": status, "x_cache": headers.get("X-Cache")}
        for case, expected in (("ours_memory_hit", "HIT"), ("ours_redis_hit", "HIT"), ("ours_pass", "BYPASS"),
                               ("nginx_hit", "HIT"), *((case, "HIT") for case in cluster_bench.CASES)):
            if case in seen and (seen[case]["status"] != 200 or seen[case]["x_cache"] != expected):
                raise RuntimeError(f"{case}: expected 200 with X-Cache {expected}, got {seen[case]}")
        return seen

    # --- speed ---

    def run_speed(self) -> None:
        urls = self.urls()
        self.results["checks"] = self.check_headers()
        warm = min(1.0, self.duration)
        if not self.smoke:
            for url in urls.values():  # JIT-free Python still warms caches, pools and allocators
                self.load(url, 50, warm)
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in THROUGHPUT_CASES}
        latency: dict[str, list[dict[str, Any]]] = {case: [] for case in LATENCY_CASES}
        lat_urls = self.latency_urls()
        for round_number in range(max(self.rounds, self.latency_rounds)):
            for case in THROUGHPUT_CASES:
                if case in urls and round_number < self.rounds:
                    result = self.load(urls[case], 50, self.duration)
                    runs[case].append(result)
                    print(f"bench: round {round_number + 1} {case}: {result['rps']:.0f} req/s", flush=True)
            for case in LATENCY_CASES:
                if case in lat_urls and round_number < self.latency_rounds:
                    result = self.load(lat_urls[case], 10, self.duration)
                    latency[case].append(result)
                    print(f"bench: round {round_number + 1} latency {case}: p50 {result['p50_ms']:.2f} ms", flush=True)
        self.results["throughput"] = {case: summarize([r["rps"] for r in rs], rs, urls.get(case))
                                      for case, rs in runs.items()}
        self.results["latency"] = {case: summarize([r["p50_ms"] for r in rs], rs, lat_urls.get(case))
                                   for case, rs in latency.items()}

    # --- RSS ---

    def run_rss(self) -> None:
        rss: dict[str, Any] = {}
        example = (ROOT / "routes.yaml").read_text()
        url = self.start_proxy("ours_example", example)
        pid = self.proc["ours_example"].pid
        time.sleep(1.0)
        rss["ours_idle_mib"] = rss_kib(pid) / 1024
        port = int(url.rsplit(":", 1)[1])
        rss["ours_1000_mib"] = asyncio.run(self._rss_holding(port, "/health/live", pid))
        self.procs.stop(self.proc.pop("ours_example"))
        if self.nginx:
            pid = self.proc["nginx"].pid
            rss["nginx_idle_mib"] = rss_kib(pid) / 1024  # after the speed runs, with its cache zone in use
            rss["nginx_1000_mib"] = asyncio.run(self._rss_holding(self.port("nginx"), HIT_PATH, pid))
        rss["connections"] = 1000
        self.results["rss"] = rss

    async def _rss_holding(self, port: int, path: str, pid: int) -> float:
        writers = await hold_connections(port, path, 1000)
        await asyncio.sleep(0.5)
        value = rss_kib(pid) / 1024
        for writer in writers:
            writer.close()
        return value

    # --- resilience ---

    def run_faults(self) -> None:
        results: dict[str, dict[str, Any]] = {who: {} for who in PROXIES}
        probes: dict[str, Any] = {}
        for scenario in fault_bench.chosen(self.args.scenarios):
            runs: dict[str, list[dict[str, Any]]] = {who: [] for who in PROXIES}
            for round_number in range(self.fault_rounds):  # interleaved: defaults, nginx, defaults, nginx, ...
                for who in PROXIES:
                    if who == "nginx" and scenario.redis:
                        item = {"skipped": "nginx has no Redis cache to lose"}
                    elif who == "nginx" and not self.nginx:
                        item = {"skipped": "nginx is not installed"}
                    else:
                        item = self.fault_run(who, scenario, fault_bench.service_name(scenario, round_number + 1),
                                              probes)
                    runs[who].append(item)
                    print(f"bench: fault {scenario.name} {who} round {round_number + 1}: " +
                          (f"skipped: {item['skipped']}" if "skipped" in item else
                           f"2xx {item['share_2xx'] * 100:.1f}%, p99 {item['p99_ms']:.1f} ms, > 0.5 s {item['slow']}, "
                           f"primary calls {item['primary_calls']}, RA violations {item['violations']}"), flush=True)
            for who in PROXIES:
                results[who][scenario.name] = fault_bench.combine(runs[who])
        results["comparison"] = fault_bench.compare(results)  # type: ignore[assignment]
        results["probe_all_down_cold"] = probes  # type: ignore[assignment]
        self.results["faults"] = results

    def counts(self, who: str, scenario: Scenario, name: str) -> dict[str, int]:
        """What the fault's providers counted so far (a refusing primary: the connection attempts made to it)."""
        primary, secondary = self.fault_ports(who, scenario)
        out = {"secondary_calls": self.calls(secondary)}
        if scenario.primary == "refuse":
            if who == "nginx":
                out["primary_calls"] = fault_bench.nginx_refusals(self.work / "nginx" / "error.log", primary)
            else:
                out["primary_calls"] = int(self.metric(who, "external_requests_total", service=name,
                                                       provider=f"{name}_primary", outcome="connect_error"))
            out["violations"] = 0
        else:
            _, _, body = http("GET", f"http://127.0.0.1:{primary}/__bench/calls")
            data = json.loads(body)
            out["primary_calls"], out["violations"] = int(data["calls"]), int(data["violations"])
        return out

    def metric(self, proxy: str, name: str, **labels: str) -> float:
        """One sample from our proxy `proxy`'s metrics port (0 when it is not exported)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, _, body = http("GET", f"http://127.0.0.1:{self.port(proxy + '_metrics')}/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def fault_run(self, who: str, scenario: Scenario, name: str, probes: dict[str, Any]) -> dict[str, Any]:
        redis_process = None
        if scenario.redis:
            if not self.redis_server:
                return {"skipped": "redis-server is not installed"}
            redis_port = self.port("throwaway_redis")
            redis_process = self.procs.start("throwaway_redis", [
                self.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"], cpu=self.load_cpu)
            deadline = time.monotonic() + 5
            while not self.redis_answers(f"redis://127.0.0.1:{redis_port}/0"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the throwaway redis-server did not start")
                time.sleep(0.05)
            services = {name: fault_bench.defaults_service(scenario, name, *self.fault_ports(who, scenario))}
            base = self.start_proxy("redis_faults", proxy_config(
                services, {"backend": "redis", "url": f"redis://127.0.0.1:{redis_port}/0", "prefix": "rp-bench:"}))
        else:
            base = f"http://127.0.0.1:{self.port(who)}"
        primary, secondary = self.fault_ports(who, scenario)
        fakes = [secondary] if scenario.primary == "refuse" else [primary, secondary]
        paths = [f"/{name}/item/{k}" for k in range(KEYS)]
        try:
            for port in fakes:
                self.mode(port, "ok")
            if scenario.warm:
                for path in paths:
                    http("GET", base + path)
                if scenario.stale:
                    time.sleep(fault_bench.TTL + 0.3)  # past the ttl: what is cached is now stale
            if scenario.primary != "refuse":
                self.mode(primary, scenario.primary)
            self.mode(secondary, scenario.secondary)
            before = self.counts(who, scenario, name)
            command = self.procs.cpu(self.load_cpu) + [
                PYTHON, "-m", "bench.loadgen", "open", "--base", base, "--rate", str(self.rate),
                "-d", str(self.scenario_seconds), "--timeout", "10"] + [arg for p in paths for arg in ("--path", p)]
            generator = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                         start_new_session=True)
            stopped_at = None
            try:
                if redis_process is not None:
                    time.sleep(self.scenario_seconds / 2)
                    self.procs.stop(redis_process)
                    stopped_at = self.scenario_seconds / 2
                out, err = generator.communicate(timeout=self.scenario_seconds + 40)
            finally:
                if generator.poll() is None:
                    os.killpg(generator.pid, signal.SIGKILL)
                    generator.wait(5)
            if generator.returncode != 0:
                raise RuntimeError(f"open-loop generator failed: {err.decode(errors='replace')}")
            after = self.counts(who, scenario, name)
            if not scenario.can_answer:
                status, headers, body = http("GET", base + paths[0])
                probes[who] = fault_bench.probe_503(headers, status, body)
        finally:
            for port in fakes:
                with contextlib.suppress(OSError):
                    self.mode(port, "ok")
            if scenario.redis:
                if "redis_faults" in self.proc:
                    self.procs.stop(self.proc.pop("redis_faults"))
                if redis_process is not None:
                    self.procs.stop(redis_process)
        data = json.loads(out)
        counts = {key: after[key] - before.get(key, 0) for key in after}
        return fault_bench.summary(data["records"], counts, self.scenario_seconds, stopped_at)

    # --- whole run ---

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.start_all()
        if not self.args.faults_only:
            self.run_speed()
            self.run_rss()
        self.run_faults()
        return self.report(started)

    def cleanup(self) -> None:
        self.procs.stop_all()
        if "ours_redis" in self.proc:
            with contextlib.suppress(Exception):
                import redis

                client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
                keys = list(client.scan_iter(match=self.redis_prefix + "*", count=500))
                if keys:
                    client.unlink(*keys)
                client.close()
        if self.args.keep_logs:
            print(f"bench: configs and process logs kept in {self.work}", flush=True)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def report(self, started: float) -> dict[str, Any]:
        r = self.results
        versions = {"nginx": tool_version([self.nginx, "-v"]) if self.nginx else None,
                    "wrk": tool_version([self.wrk, "-v"]) if self.wrk else None,
                    "redis": tool_version([self.redis_server, "--version"]) if self.redis_server else None}
        r["meta"] = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "smoke" if self.smoke else "full",
            "machine": machine(), "tools": versions,
            "load_generator": "wrk" if self.wrk else "python (bench/loadgen.py)",
            "pinning": {"proxies": self.subject_cpu, "load_and_fakes": self.load_cpu} if self.procs.pin else None,
            "seconds_per_run": self.duration, "rounds": self.rounds,
            "latency_rounds": self.latency_rounds, "fault_seconds": self.scenario_seconds,
            "fault_rounds": self.fault_rounds,
            "fault_rate": self.rate, "wall_seconds": round(time.time() - started, 1),
            "commands": self.procs.commands, "notes": self.notes,
            "nginx": "included" if self.nginx else ("skipped (--skip-nginx)" if self.args.skip_nginx
                                                    else "skipped (not installed)"),
        }
        r["scenarios"] = {s.name: s.what for s in SCENARIOS}
        r["ratios"] = ratios(r) if "throughput" in r else {}
        r["targets"] = targets(r)
        return r


# --- summaries -------------------------------------------------------------------------------------

def summarize(values: list[float | None], runs: list[dict[str, Any]], url: str | None) -> dict[str, Any]:
    clean = [v for v in values if v is not None]
    if not clean:
        return {"skipped": "not run (see notes)", "runs": []}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "runs": clean,
            "p50_ms": statistics.median([r["p50_ms"] for r in runs if r.get("p50_ms") is not None] or [0.0]),
            "p99_ms": statistics.median([r["p99_ms"] for r in runs if r.get("p99_ms") is not None] or [0.0]),
            "non_2xx": sum(r.get("non_2xx", 0) for r in runs), "errors": sum(r.get("socket_errors", 0) for r in runs),
            "url": url}


def spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"skipped": "a side of the ratio was not run"}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def paired(a: dict[str, Any], b: dict[str, Any], op: str = "div") -> dict[str, Any]:
    """Per-round pairs (the runs were interleaved), so the min–max shows how much a round moved."""
    left, right = a.get("runs", []), b.get("runs", [])
    pairs = list(zip(left, right))
    if op == "div":
        return spread([x / y for x, y in pairs if y])
    return spread([x - y for x, y in pairs])


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    t, lat = r["throughput"], r["latency"]
    out = {
        "memory_hit_vs_ceiling": paired(t["ours_memory_hit"], t["ceiling"]),
        "redis_hit_vs_ceiling": paired(t["ours_redis_hit"], t["ceiling"]),
        "pass_vs_minimal": paired(t["ours_pass"], t["minimal_pass"]),
        "memory_hit_vs_nginx": paired(t["ours_memory_hit"], t["nginx_hit"]),
        "redis_hit_vs_nginx": paired(t["ours_redis_hit"], t["nginx_hit"]),
        "cluster_hit_vs_redis_hit": paired(t["ours_cluster_hit"], t["ours_redis_hit"]),
        "cluster_remote_vs_redis_remote": paired(t["ours_cluster_remote_hit"], t["ours_redis_remote_hit"]),
        "ceiling_vs_nginx_hit": paired(t["ceiling"], t["nginx_hit"]),
        "pass_vs_nginx": paired(t["ours_pass"], t["nginx_pass"]),
        "minimal_pass_vs_nginx": paired(t["minimal_pass"], t["nginx_pass"]),
        "added_ms_ours": paired(lat["ours"], lat["direct"], "sub"),
        "added_ms_minimal": paired(lat["minimal"], lat["direct"], "sub"),
        "added_ms_nginx": paired(lat["nginx"], lat["direct"], "sub"),
    }
    ours, nginx = out["added_ms_ours"], out["added_ms_nginx"]
    if "runs" in ours and "runs" in nginx:
        out["added_ms_ours_vs_nginx"] = spread([x / y for x, y in zip(ours["runs"], nginx["runs"]) if y > 0])
    else:
        out["added_ms_ours_vs_nginx"] = {"skipped": "nginx was not run"}
    rss = r["rss"]
    for state in ("idle", "1000"):
        if rss.get(f"nginx_{state}_mib"):
            out[f"rss_{state}_vs_nginx"] = spread([rss[f"ours_{state}_mib"] / rss[f"nginx_{state}_mib"]])
        else:
            out[f"rss_{state}_vs_nginx"] = {"skipped": "nginx was not run"}
    return out


def _met(value: float | None, limit: float, higher_is_better: bool) -> bool | None:
    if value is None:
        return None
    return value >= limit if higher_is_better else value <= limit


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    ra, rss = r["ratios"], r.get("rss", {})
    rows = [] if not ra else [
        ("memory-cache HIT vs the Python ceiling", ">= 0.80x", ra["memory_hit_vs_ceiling"].get("median"), 0.80, True, "x"),
        ("Redis-backed HIT vs the Python ceiling", ">= 0.70x", ra["redis_hit_vs_ceiling"].get("median"), 0.70, True, "x"),
        ("pass-through vs the minimal aiohttp proxy", ">= 1.0x", ra["pass_vs_minimal"].get("median"), 1.0, True, "x"),
        ("added latency p50 over a 20 ms upstream, c=10", "<= +0.6 ms", ra["added_ms_ours"].get("median"), 0.6, False, "ms"),
        ("RSS idle, example config", "<= 64 MB", rss.get("ours_idle_mib"), 64.0, False, "MiB"),
        ("RSS holding 1,000 connections", "<= 128 MB", rss.get("ours_1000_mib"), 128.0, False, "MiB"),
    ]
    out = [{"target": name, "goal": goal, "value": value, "unit": unit, "met": _met(value, limit, higher)}
           for name, goal, value, limit, higher, unit in rows]
    for row in r["faults"]["comparison"]:
        if "skipped" in row or row["met"] is None:
            continue
        goal = "every column at least as good as nginx" + (", 0 requests > 0.5 s" if "hang_target" in row else "")
        behind = row["behind"]
        out.append({"target": f"{row['scenario']}: defaults against nginx", "goal": goal, "value": len(behind),
                    "unit": "columns behind" + (f" ({', '.join(behind)})" if behind else ""), "met": row["met"]})
    return out


# --- markdown ---------------------------------------------------------------------------------------

def _num(value: Any, digits: int = 2) -> str:
    return fault_bench.number_text(value, digits)


def _range(item: dict[str, Any], digits: int = 2, unit: str = "") -> str:
    if "skipped" in item:
        return "skipped"
    return f"{_num(item['median'], digits)}{unit} ({_num(item['min'], digits)}–{_num(item['max'], digits)})"


def markdown(r: dict[str, Any]) -> str:
    meta, m = r["meta"], r["meta"]["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `make bench` (`python -m bench`) on {meta['date']}; mode: {meta['mode']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB, Linux {m['kernel']}; Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}; idle cores: {m.get('idle') or 'unknown'}; "
        f"{meta['tools']['nginx'] or 'nginx: not run'}; "
        f"{meta['tools']['wrk'] or 'wrk: not installed'}; {meta['tools']['redis'] or 'redis-server: not installed'}.",
        "",
        f"Load: {meta['load_generator']}; {meta['rounds']} interleaved rounds of {meta['seconds_per_run']:g} s per case "
        f"({meta['latency_rounds']} for the latency cases); "
        + (f"proxies pinned to CPU {meta['pinning']['proxies']}, load generator and fake providers to CPU "
           f"{meta['pinning']['load_and_fakes']}." if meta["pinning"] else "no core pinning."),
        "Figures are medians over the rounds, (min–max) in brackets; a ratio is taken per round, then the median.",
        ""]
    if "throughput" in r:
        lines += _speed_headline(r)
    lines += [
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for row in r["targets"]:
        met = "n/a" if row["met"] is None else ("met" if row["met"] else "**not met**")
        lines.append(f"| {row['target']} | {row['goal']} | {_num(row['value'])} {row['unit']} | {met} |")
    if "throughput" in r:
        lines += _speed_tables(r)
    lines += [""] + fault_bench.markdown(r["faults"], meta)
    lines += ["", "## Notes", ""] + [f"- {note}" for note in meta["notes"] or ["none"]]
    lines += _commands(meta)
    return "\n".join(lines)


def _speed_headline(r: dict[str, Any]) -> list[str]:
    ra, t, rss = r["ratios"], r["throughput"], r["rss"]
    return [
        "## Headline",
        "",
        "| figure | ours | ratio | vs nginx |",
        "|---|---|---|---|",
        f"| memory-cache HIT, c=50 | {_range(t['ours_memory_hit'], 0, ' req/s')} | "
        f"{_range(ra['memory_hit_vs_ceiling'])}× the Python ceiling | {_range(ra['memory_hit_vs_nginx'])}× |",
        f"| Redis-backed HIT, c=50 | {_range(t['ours_redis_hit'], 0, ' req/s')} | "
        f"{_range(ra['redis_hit_vs_ceiling'])}× the Python ceiling | {_range(ra['redis_hit_vs_nginx'])}× |",
        f"| Redis Cluster HIT, c=50 | {_range(t['ours_cluster_hit'], 0, ' req/s')} | "
        f"{_range(ra['cluster_hit_vs_redis_hit'])}× single-node Redis; every HIT from Redis (local_ttl 0): "
        f"{_range(ra['cluster_remote_vs_redis_remote'])}× | |",
        f"| pass-through, c=50 | {_range(t['ours_pass'], 0, ' req/s')} | "
        f"{_range(ra['pass_vs_minimal'])}× the minimal aiohttp proxy | {_range(ra['pass_vs_nginx'])}× |",
        f"| added p50 latency over a 20 ms upstream, c=10 | {_range(ra['added_ms_ours'], 2, ' ms')} | "
        f"minimal aiohttp proxy: {_range(ra['added_ms_minimal'], 2, ' ms')} | "
        f"nginx: {_range(ra['added_ms_nginx'], 2, ' ms')}; ours/nginx {_range(ra['added_ms_ours_vs_nginx'])}× |",
        f"| RSS idle (routes.yaml) | {_num(rss.get('ours_idle_mib'), 1)} MiB | | "
        f"nginx {_num(rss.get('nginx_idle_mib'), 1)} MiB; {_range(ra['rss_idle_vs_nginx'], 1)}× |",
        f"| RSS holding 1,000 connections | {_num(rss.get('ours_1000_mib'), 1)} MiB | | "
        f"nginx {_num(rss.get('nginx_1000_mib'), 1)} MiB; {_range(ra['rss_1000_vs_nginx'], 1)}× |",
        "",
    ]


def _speed_tables(r: dict[str, Any]) -> list[str]:
    t, lat = r["throughput"], r["latency"]
    lines = ["", "## Throughput (c=50, req/s)", "", "| case | what | req/s | p50 ms | p99 ms | non-2xx |",
              "|---|---|---|---|---|---|"]
    what = {"ceiling": "bare aiohttp server, fixed body (bench/servers.py hello)",
            "ours_memory_hit": "our proxy, memory cache, HIT", "ours_redis_hit": "our proxy, cache.backend redis, HIT",
            "nginx_hit": "nginx proxy_cache HIT", "minimal_pass": "minimal aiohttp proxy (one shared ClientSession)",
            "ours_pass": "our proxy, service without cache (X-Cache: BYPASS)", "nginx_pass": "nginx proxy_pass, keepalive",
            **cluster_bench.WHAT}
    for case in THROUGHPUT_CASES:
        item = t[case]
        if "skipped" in item:
            lines.append(f"| {case} | {what[case]} | skipped | | | |")
        else:
            lines.append(f"| {case} | {what[case]} | {_range(item, 0)} | {_num(item['p50_ms'])} | "
                         f"{_num(item['p99_ms'])} | {item['non_2xx'] + item['errors']} |")
    lines += ["", "## Latency over a 20 ms upstream (c=10, p50 ms)", "",
              "The fake provider answers 20 ms after it read the request, timed by a timerfd (not by uvloop's "
              "millisecond timers, whose error depended on how the requests arrived).", "",
              "| path | p50 ms | p99 ms |", "|---|---|---|"]
    for case in LATENCY_CASES:
        item = lat[case]
        lines.append(f"| {case} | {_range(item)} | {_num(item.get('p99_ms'))} |" if "skipped" not in item
                     else f"| {case} | skipped | |")
    return lines


def _commands(meta: dict[str, Any]) -> list[str]:
    return ["", "## Commands", "", "The harness ran (ports picked free at run time; paths relative to the repo). "
              "The route tables and nginx.conf are generated by `bench/harness.py` (`speed_services`, "
              "`nginx_config` from `bench/nginx.conf.tmpl`) and `bench/faults.py` (`defaults_service`, `nginx_parts`); `python -m bench --keep-logs` keeps "
              "them with every process's log in the temp dir it prints.",
              "", "```"] + meta["commands"] + [
              ("taskset -c 0 " if meta["pinning"] else "") + f"wrk -t1 -c50 -d{meta['seconds_per_run']:g}s --latency --timeout 10s <url>   (c=10 for latency)"
              if meta["load_generator"] == "wrk" else
              f"python -m bench.loadgen closed --url <url> -c 50 -d {meta['seconds_per_run']:g}",
              ("taskset -c 0 " if meta["pinning"] else "") + f"python -m bench.loadgen open --base <proxy> --rate {meta['fault_rate']:g} -d {meta['fault_seconds']:g} "
              "--timeout 10 --path ...", "```", ""]


# --- entry point ------------------------------------------------------------------------------------

def _positive(kind: type) -> Any:
    """An argparse type: a number of `kind` above zero (0 would otherwise read as "the default")."""
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error for an unparsable value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every case and scenario once, ~1 s each, into a temp dir")
    parser.add_argument("--out", help="directory for results.md and results.json (default: bench/, or a temp dir "
                                      "with --smoke)")
    parser.add_argument("--duration", type=_positive(float), help="seconds per speed run (default 5; smoke 1)")
    parser.add_argument("--rounds", type=_positive(int), help="interleaved rounds per speed case (default 3; smoke 1)")
    parser.add_argument("--latency-rounds", type=_positive(int), help="rounds per latency case (default 5; smoke 1)")
    parser.add_argument("--scenario-seconds", type=_positive(float),
                        help="seconds per fault scenario (default 15; smoke 1)")
    parser.add_argument("--rate", type=_positive(float), default=200.0,
                        help="open-loop request rate for faults (default 200)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--skip-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--skip-cluster", action="store_true", help="leave the Redis Cluster HIT cases out")
    parser.add_argument("--faults-only", action="store_true", help="only the resilience scenarios (no speed, no RSS)")
    parser.add_argument("--fault-rounds", type=_positive(int),
                        help="interleaved runs per fault scenario and proxy, medians reported (default 5: one run's "
                             "p99 moves by a millisecond or two; smoke 1)")
    parser.add_argument("--scenarios", help="only these fault scenarios, comma-separated (their healthy reference "
                                            "is run too)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/nginx")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configs and process logs")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="rp-bench-out-")) if args.smoke else BENCH)
    out.mkdir(parents=True, exist_ok=True)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    bench = Bench(args)
    try:
        results = bench.run()
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(f"bench: wrote {out / 'results.md'} and {out / 'results.json'} in {results['meta']['wall_seconds']} s")
    return 0
