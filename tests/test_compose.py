"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

Three layers:

* **Structure**: the compose file parsed with ``yaml.safe_load`` follows the Compose
  specification's shape (top-level keys, each service's keys, ports, volumes, depends_on),
  and the Dockerfile's two targets install only what their service runs, as a non-root user,
  with the broker's HEALTHCHECK running ``zchat-broker check``.
* **Consistency with the code**: every service runs a console script of the installed zchat
  distributions (and a bot that ``zchat-bot --list`` knows); every ``ZCHAT_*`` variable it
  sets is one that program reads; the broker binds every interface inside its container on
  the ports the compose file publishes, and the other services reach it by its service name.
* **The topology, run without Docker**: each service of the default profile is started as a
  local process with the compose file's environment, service names mapped to 127.0.0.1 and
  the published ports remapped to free ones; a client then chats and is greeted.
* **The secure variant** (``docker-compose.secure.yml`` over the default file): merged as
  Compose merges, its keygen, broker, bot and client agree on where the keys are, read only
  variables their programs read, and run the same way with a temporary key directory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sysconfig
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, distribution, entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

from zchat.broker import tools
from zchat.broker.config import OPTIONS as BROKER_OPTIONS
from zchat.client import Client, EventKind
from zchat.client.cli import OPTIONS as CLIENT_OPTIONS
from zchat.common.config import ENV_CONFIG, Option, parse_bool
from zchat.common.protocol import Event

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SCRIPTS = Path(sysconfig.get_paths()["scripts"])
#: Longest any single wait in this file may take.
WAIT = 8.0

# -- the Compose specification (compose-spec/compose-spec, schema/compose-spec.json) -----------

TOP_LEVEL_KEYS = {"services", "volumes", "networks", "configs", "secrets", "name"}
SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup", "cgroup_parent", "command",
    "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota", "cpu_rt_period",
    "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "credential_spec", "depends_on", "deploy", "develop",
    "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file",
    "environment", "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add", "healthcheck",
    "hostname", "image", "init", "ipc", "isolation", "label_file", "labels", "links", "logging", "mac_address",
    "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit", "models", "network_mode", "networks",
    "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform", "ports", "post_start", "pre_stop",
    "privileged", "profiles", "provider", "pull_policy", "pull_refresh_after", "read_only", "restart", "runtime",
    "scale", "secrets", "security_opt", "shm_size", "stdin_open", "stop_grace_period", "stop_signal",
    "storage_opt", "sysctls", "tmpfs", "tty", "ulimits", "use_api_socket", "user", "userns_mode", "uts", "volumes",
    "volumes_from", "working_dir",
}  # fmt: skip
BUILD_KEYS = {
    "context", "dockerfile", "dockerfile_inline", "entitlements", "args", "ssh", "labels", "cache_from", "cache_to",
    "no_cache", "additional_contexts", "network", "pull", "target", "shm_size", "extra_hosts", "isolation",
    "privileged", "secrets", "tags", "ulimits", "platforms",
}  # fmt: skip
DEPENDS_ON_KEYS = {"condition", "required", "restart"}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
HEALTHCHECK_KEYS = {"disable", "interval", "retries", "test", "timeout", "start_period", "start_interval"}
VOLUME_KEYS = {"name", "driver", "driver_opts", "external", "labels"}
RESTART_POLICIES = re.compile(r"no|always|unless-stopped|on-failure(:\d+)?")
DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(h|m|s|ms|us))+")
#: Short port syntax as this project writes it: HOST_IP:HOST_PORT:CONTAINER_PORT.
PORT = re.compile(r"(?P<ip>\d{1,3}(?:\.\d{1,3}){3}):(?P<host>\d+):(?P<container>\d+)(?:/tcp)?")
ENDPOINT = re.compile(r"tcp://(?P<host>[^:/]+|\[[^\]]+\]):(?P<port>\d+)")
ALL_INTERFACES = {"0.0.0.0", "*", "::", "[::]"}


# -- reading the compose file ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict) and found
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the list (KEY=VALUE) form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def words(value: Any) -> list[str]:
    """A command or entrypoint in exec (list) or shell (string) form, as words."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(word) for word in value]


def argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: compose's entrypoint/command over the image's ENTRYPOINT/CMD.

    As in Docker: a compose ``entrypoint`` also drops the image's CMD.
    """
    image = instructions(build_target(service))
    image_entrypoint = exec_form(last(image, "ENTRYPOINT") or "[]")
    image_cmd = exec_form(last(image, "CMD") or "[]")
    entrypoint = words(service["entrypoint"]) if "entrypoint" in service else image_entrypoint
    if "command" in service:
        command = words(service["command"])
    elif "entrypoint" in service:
        command = []
    else:
        command = image_cmd
    return entrypoint + command


def default_profile() -> dict[str, dict[str, Any]]:
    """The services ``docker compose up`` starts: those without profiles."""
    return {name: svc for name, svc in services().items() if not svc.get("profiles")}


def broker_service() -> tuple[str, dict[str, Any]]:
    found = [(name, svc) for name, svc in services().items() if argv(svc)[:1] == ["zchat-broker"]]
    assert len(found) == 1, "exactly one service runs the broker"
    return found[0]


def published(service: dict[str, Any]) -> list[re.Match[str]]:
    matches = []
    for entry in service.get("ports", []):
        match = PORT.fullmatch(str(entry))
        assert match, f"port {entry!r} is not HOST_IP:HOST_PORT:CONTAINER_PORT"
        matches.append(match)
    return matches


def endpoint_port(endpoint: str) -> int:
    match = ENDPOINT.fullmatch(endpoint)
    assert match, f"{endpoint!r} is not tcp://HOST:PORT"
    return int(match.group("port"))


def seconds(duration: str) -> float:
    assert DURATION.fullmatch(duration), duration
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * unit[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration))


# -- reading the Dockerfile --------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def stages() -> dict[str, Stage]:
    """The Dockerfile's stages by name, each with its instructions (continuations joined)."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = [word for word in rest.split() if not word.startswith("--")]
            name = parts[2] if len(parts) == 3 and parts[1].lower() == "as" else f"stage-{len(found)}"
            current = found[name] = Stage(name, parts[0])
        else:
            assert current is not None, f"{keyword} before FROM"
            current.instructions.append((keyword, rest))
    return found


def chain(target: str) -> list[Stage]:
    """The stages ``target`` builds on, the first FROM an image, ``target`` last."""
    every = stages()
    assert target in every, f"the Dockerfile has no stage {target!r}"
    out = [every[target]]
    while out[0].base in every:
        out.insert(0, every[out[0].base])
    return out


def instructions(target: str) -> list[tuple[str, str]]:
    return [instruction for stage in chain(target) for instruction in stage.instructions]


def last(image: list[tuple[str, str]], keyword: str) -> str | None:
    found = [rest for kw, rest in image if kw == keyword]
    return found[-1] if found else None


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"{rest!r}: use the exec form, so the program is PID 1 and gets SIGTERM"
    parsed = json.loads(rest)
    assert isinstance(parsed, list)
    return [str(word) for word in parsed]


def build_target(service: dict[str, Any]) -> str:
    build = service.get("build")
    assert isinstance(build, dict) and "target" in build, "each service builds a named Dockerfile target"
    return str(build["target"])


def project_name(path: str) -> str:
    """The distribution a local path installs (from its pyproject.toml), or the name as given."""
    pyproject = REPO / path / "pyproject.toml"
    if pyproject.exists():
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"])
    return path


def installed_by(target: str) -> set[str]:
    """The distributions the ``pip install`` commands of ``target``'s stages install."""
    names: set[str] = set()
    for keyword, rest in instructions(target):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            parts = shlex.split(command)
            for i in range(len(parts) - 1):
                if parts[i].endswith("pip") and parts[i + 1] == "install":
                    names |= {project_name(p) for p in parts[i + 2 :] if not p.startswith("-")}
    return names


def env_of_image(target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions(target):
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# -- the installed programs --------------------------------------------------------------------


def console_scripts() -> dict[str, EntryPoint]:
    """The console scripts of the installed zchat-* distributions, by name."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group="console_scripts"):
        if ep.dist is not None and ep.dist.name.lower().startswith("zchat-"):
            found[ep.name] = ep
    return found


def require_script(name: str) -> EntryPoint:
    scripts = console_scripts()
    if name == "zchat-bot" and name not in scripts:
        pytest.skip("zchat-bot is not installed yet")
    assert name in scripts, f"{name} is not a console script of the zchat distributions: {sorted(scripts)}"
    assert (SCRIPTS / name).exists()
    return scripts[name]


def zchat_requirements(dist: str) -> set[str]:
    """``dist`` and the zchat-* distributions it needs, transitively."""
    needed, todo = set(), [dist]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        for req in distribution(name).requires or []:
            match = re.match(r"[A-Za-z0-9._-]+", req)
            if match and match.group(0).lower().startswith("zchat-") and "extra ==" not in req:
                todo.append(match.group(0).lower())
    return needed


def env_names_read(command: list[str]) -> set[str]:
    """The ZCHAT_* variables the program ``command`` reads: its Option tables and ZCHAT_CONFIG."""
    options: list[Option] = []
    if command[0] == "zchat-broker":
        options += BROKER_OPTIONS
    elif command[0] == "zchat-client":
        options += CLIENT_OPTIONS
    elif command[0] == "zchat-bot":
        botcli = importlib.import_module(require_script("zchat-bot").module)
        target = botcli.find_target(command[1])
        options += [*botcli.common_options(target.defaults), *target.options]
    elif command[0] == "zchat-keygen":
        return set()  # flags only
    else:
        raise AssertionError(f"unknown program {command[0]}")
    return {opt.env for opt in options} | {ENV_CONFIG}


# -- structure of the compose file -------------------------------------------------------------


def test_top_level_keys_are_from_the_compose_specification() -> None:
    extra = {key for key in compose() if key not in TOP_LEVEL_KEYS and not key.startswith("x-")}
    assert not extra, f"not Compose specification top-level keys: {extra} (and 'version' is obsolete)"


@pytest.mark.parametrize("name", list(services()))
def test_service_keys_are_from_the_compose_specification(name: str) -> None:
    service = services()[name]
    assert re.fullmatch(r"[a-zA-Z0-9._-]+", name)
    assert not {key for key in service if key not in SERVICE_KEYS and not key.startswith("x-")}
    build = service.get("build")
    if isinstance(build, dict):
        assert not set(build) - BUILD_KEYS
        assert (REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).exists()
    if "restart" in service:
        assert RESTART_POLICIES.fullmatch(service["restart"])
    if "stop_grace_period" in service:
        assert DURATION.fullmatch(service["stop_grace_period"])
    if "healthcheck" in service:
        assert not set(service["healthcheck"]) - HEALTHCHECK_KEYS
    for key in ("command", "entrypoint"):
        assert isinstance(service.get(key, []), list | str)


def test_depends_on_names_services_that_exist_with_valid_conditions() -> None:
    every = services()
    for name, service in every.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, how in depends.items():
            assert target in every, f"{name} depends on a service that does not exist: {target}"
            assert target != name
            assert not set(how) - DEPENDS_ON_KEYS
            assert how["condition"] in DEPENDS_ON_CONDITIONS
            if how["condition"] == "service_healthy":  # it must have a health check to become healthy
                assert "healthcheck" in every[target] or last(instructions(build_target(every[target])), "HEALTHCHECK")


def test_named_volumes_are_declared_and_the_store_is_on_one() -> None:
    declared = compose().get("volumes") or {}
    for volume in declared.values():
        assert volume is None or not set(volume) - VOLUME_KEYS
    for name, service in services().items():
        for mount in service.get("volumes", []):
            source = mount["source"] if isinstance(mount, dict) else str(mount).split(":")[0]
            if not source.startswith(("/", ".", "~", "$")):
                assert source in declared, f"{name} mounts the undeclared volume {source!r}"
    _, broker = broker_service()
    data_dir = environment(broker)["ZCHAT_DATA_DIR"]
    mounts = [str(m).split(":") for m in broker.get("volumes", [])]
    assert any(len(m) >= 2 and m[0] in declared and m[1] == data_dir for m in mounts), (
        f"the broker's ZCHAT_DATA_DIR {data_dir} is not on a named volume, so the history dies with the container"
    )
    image = instructions(build_target(broker))
    assert json.loads(last(image, "VOLUME") or "[]") == [data_dir]
    assert env_of_image(build_target(broker)).get("ZCHAT_DATA_DIR") == data_dir


def test_the_published_ports_are_the_ones_the_broker_binds_on_every_interface() -> None:
    _, broker = broker_service()
    env = environment(broker)
    bound: set[int] = set()
    for variable in ("ZCHAT_ROUTER", "ZCHAT_PUB"):
        assert variable in env, f"without {variable} the broker binds 127.0.0.1 inside its container"
        match = ENDPOINT.fullmatch(env[variable])
        assert match, env[variable]
        assert match.group("host") in ALL_INTERFACES, f"{variable}: other containers could not reach it"
        bound.add(int(match.group("port")))
    if "ZCHAT_METRICS_PORT" in env:
        bound.add(int(env["ZCHAT_METRICS_PORT"]))
        assert env.get("ZCHAT_METRICS_HOST") in ALL_INTERFACES, "a published metrics port must bind every interface"
    ports = published(broker)
    assert {int(p.group("container")) for p in ports} == bound
    assert all(p.group("ip") == "127.0.0.1" for p in ports), "publish on the host's loopback only"
    exposed = [rest.split() for keyword, rest in instructions(build_target(broker)) if keyword == "EXPOSE"]
    assert bound <= {int(port) for ports in exposed for port in ports}


@pytest.mark.parametrize("name", [name for name, svc in services().items() if argv(svc)[:1] != ["zchat-broker"]])
def test_every_other_service_reaches_the_broker_by_its_service_name(name: str) -> None:
    broker_name, broker = broker_service()
    ports = {variable: endpoint_port(environment(broker)[variable]) for variable in ("ZCHAT_ROUTER", "ZCHAT_PUB")}
    service = services()[name]
    env = environment(service)
    for variable, port in ports.items():
        assert variable in env, f"{name}: without {variable} it looks for the broker on its own loopback"
        assert env[variable] == f"tcp://{broker_name}:{port}"
    depends = service.get("depends_on", {})
    assert broker_name in depends, f"{name} should start after the broker"


# -- the services run programs that exist ------------------------------------------------------


@pytest.mark.parametrize("name", list(services()))
def test_each_service_runs_an_installed_zchat_program(name: str) -> None:
    command = argv(services()[name])
    ep = require_script(command[0])
    module = importlib.import_module(ep.module)
    args = command[1:]
    if command[0] == "zchat-broker" and args and args[0] in tools.SUBCOMMANDS:
        return
    if command[0] == "zchat-bot":
        listed = subprocess.run(
            [str(SCRIPTS / "zchat-bot"), "--list"], capture_output=True, text=True, timeout=WAIT, check=False
        )
        assert listed.returncode == 0, listed.stderr
        assert args[0] in {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
        parser = module.build_parser(module.find_target(args[0]))
    else:
        parser = module.build_parser()
    parser.parse_args(args)  # its flags exist (argparse exits 2 otherwise)


@pytest.mark.parametrize("name", list(services()))
def test_each_service_sets_only_variables_its_program_reads(name: str) -> None:
    service = services()[name]
    set_here = {key for key in environment(service) if key.startswith("ZCHAT_")}
    unknown = set_here - env_names_read(argv(service))
    assert not unknown, f"{name} sets variables {argv(service)[0]} never reads: {unknown}"


# -- the Dockerfile ----------------------------------------------------------------------------


def test_the_base_image_is_an_official_slim_python() -> None:
    roots = {chain(name)[0].base for name in stages()}
    assert len(roots) == 1
    (root,) = roots
    assert re.fullmatch(
        r"(docker\.io/)?(library/)?python:3\.(1[1-9])(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", root
    )


@pytest.mark.parametrize("name", list(services()))
def test_each_services_target_installs_only_what_its_program_needs(name: str) -> None:
    """What a target installs is exactly what the programs of the services built from it need."""
    target = build_target(services()[name])
    needed: set[str] = set()
    for service in services().values():
        if build_target(service) == target:
            dist = require_script(argv(service)[0]).dist
            assert dist is not None
            needed |= zchat_requirements(dist.name.lower())
    assert installed_by(target) == needed, f"target {target} installs {installed_by(target)}, needs {needed}"


def test_the_broker_and_client_targets_split_the_distributions() -> None:
    assert installed_by("broker") == {"zchat-common", "zchat-broker"}
    assert installed_by("client") == {"zchat-common", "zchat-client"}
    assert {build_target(svc) for svc in services().values()} == {"broker", "client"}
    assert build_target(broker_service()[1]) == "broker"


@pytest.mark.parametrize("target", ["broker", "client"])
def test_each_target_runs_as_a_non_root_user(target: str) -> None:
    image = instructions(target)
    users = [i for i, (kw, _) in enumerate(image) if kw == "USER"]
    starts = [i for i, (kw, _) in enumerate(image) if kw in ("CMD", "ENTRYPOINT")]
    assert users and starts
    user = image[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    assert users[-1] < starts[-1], "USER must come before CMD/ENTRYPOINT"
    for i in starts:
        exec_form(image[i][1])


def test_the_broker_target_has_a_healthcheck_running_zchat_broker_check() -> None:
    healthcheck = last(instructions("broker"), "HEALTHCHECK")
    assert healthcheck is not None
    options, _, command = healthcheck.partition("CMD ")
    assert all(option.startswith("--") for option in options.split())
    words = exec_form(command.strip())
    assert words[:2] == ["zchat-broker", "check"]
    require_script("zchat-broker")
    # The check must give up before Docker's own --timeout does.
    check_timeout = float(words[words.index("--timeout") + 1]) if "--timeout" in words else 2.0
    docker_timeout = re.search(r"--timeout=(\S+)", options)
    assert docker_timeout is None or check_timeout < seconds(docker_timeout.group(1))


# -- the topology, run without Docker ----------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports the OS has just handed out on loopback (held together so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Topology:
    """The compose services as local processes: one host, so service names are 127.0.0.1."""

    tmp: Path
    #: Compose's container ports -> the free ports used instead. The fixed 5555/5556/9100 may
    #: be taken on this machine (a developer's broker, another test run), and all "containers"
    #: share one network namespace here, so each gets a port chosen now.
    ports: dict[int, int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: The services (docker-compose.yml's, or merged with an override file).
    spec: dict[str, dict[str, Any]] = field(default_factory=services)
    #: Paths inside the containers (volume mount points) -> local directories standing in.
    mounts: dict[str, Path] = field(default_factory=dict)

    def local_path(self, value: str) -> str:
        """``value`` with a container mount point replaced by its local stand-in."""
        for mount, local in self.mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        return value

    def env(self, service: dict[str, Any], *, bind_loopback: bool = True) -> dict[str, str]:
        """``service``'s environment for a local process (``bind_loopback``: no 0.0.0.0)."""
        names = set(self.spec)
        out = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
        for key, value in environment(service).items():
            if match := ENDPOINT.fullmatch(value):
                host, port = match.group("host"), int(match.group("port"))
                if host in names or (bind_loopback and host in ALL_INTERFACES):
                    host = "127.0.0.1"
                out[key] = f"tcp://{host}:{self.ports.get(port, port)}"
            elif key == "ZCHAT_METRICS_PORT":
                out[key] = str(self.ports[int(value)])
            elif key == "ZCHAT_METRICS_HOST" and bind_loopback:
                out[key] = "127.0.0.1"
            elif key == "ZCHAT_DATA_DIR":
                out[key] = str(self.tmp / "data")
            else:
                out[key] = self.local_path(value)
        return out

    def start(self, name: str) -> subprocess.Popen[bytes]:
        service = self.spec[name]
        command = [self.local_path(word) for word in argv(service)]
        command[0] = str(SCRIPTS / command[0])
        with (self.tmp / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(service))
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def healthy(self, name: str) -> bool:
        """The image's HEALTHCHECK command, run with the service's environment as Docker would."""
        healthcheck = last(instructions(build_target(self.spec[name])), "HEALTHCHECK")
        assert healthcheck is not None
        command = exec_form(healthcheck.partition("CMD ")[2].strip())
        command[0] = str(SCRIPTS / command[0])
        env = self.env(self.spec[name], bind_loopback=False)  # as in the container: tcp://0.0.0.0:PORT
        return subprocess.run(command, env=env, capture_output=True, timeout=WAIT, check=False).returncode == 0

    def stop(self, name: str, grace: float) -> int:
        """SIGTERM, as ``docker compose stop`` sends; SIGKILL after ``grace`` seconds."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise AssertionError(f"{name} did not stop within {grace} s of SIGTERM:\n{self.log(name)}") from None

    def client(self, nick: str) -> Client:
        """A connected Client configured like the compose file's zchat-client service."""
        name = next(n for n, svc in self.spec.items() if argv(svc)[:1] == ["zchat-client"])
        env = self.env(self.spec[name])
        chat = Client(env["ZCHAT_ROUTER"], env["ZCHAT_PUB"], timeout=3, server_key=env.get("ZCHAT_SERVER_KEY"),
                      key=env.get("ZCHAT_KEY"))
        chat.connect(nick)
        return chat


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    container_ports = sorted({int(p.group("container")) for svc in services().values() for p in published(svc)})
    running = Topology(tmp_path, dict(zip(container_ports, free_ports(len(container_ports)), strict=True)))
    yield running
    for proc in running.procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def wait_healthy(topology: Topology, name: str) -> None:
    deadline = time.monotonic() + WAIT
    while not topology.healthy(name):
        proc = topology.procs[name]
        assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{topology.log(name)}"
        assert time.monotonic() < deadline, f"{name} not healthy within {WAIT} s:\n{topology.log(name)}"


def next_event(chat: Client, match: Any, timeout: float = WAIT) -> Event:
    """The first event for which ``match(event)`` is true, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no matching event in time"
        event = chat.recv_event(timeout=remaining)
        if match(event):
            return event


def is_greeting(event: Event, greeter: str, nick: str) -> bool:
    return event.kind is EventKind.MESSAGE and event.sender == greeter and nick in event.text


@pytest.mark.timeout(30)
def test_the_broker_service_runs_and_clients_chat_through_it(topology: Topology) -> None:
    broker_name, broker = broker_service()
    proc = topology.start(broker_name)
    wait_healthy(topology, broker_name)

    alice, bob = topology.client("alice"), topology.client("bob")
    try:
        bob.join("general")
        alice.join("general")
        sent = alice.say("general", "hello from compose")
        said = next_event(bob, lambda e: e.kind is EventKind.MESSAGE and e.sender == "alice")
        assert (said.text, said.id) == ("hello from compose", sent.id)
    finally:
        alice.close()
        bob.close()
    metrics_port = topology.ports[int(environment(broker)["ZCHAT_METRICS_PORT"])]
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=WAIT):
        pass  # the metrics endpoint listens where the compose file publishes it
    assert (topology.tmp / "data").is_dir()  # the store went to ZCHAT_DATA_DIR
    assert topology.stop(broker_name, seconds(broker.get("stop_grace_period", "10s"))) == 0
    assert proc.returncode == 0


@pytest.mark.timeout(30)
def test_the_default_profile_greets_a_joining_client(topology: Topology) -> None:
    profile = default_profile()
    broker_name, broker = broker_service()
    assert broker_name in profile
    bots = [name for name, svc in profile.items() if argv(svc)[:1] == ["zchat-bot"]]
    assert bots, "the default profile runs a greeter bot"
    require_script("zchat-bot")
    topology.start(broker_name)
    wait_healthy(topology, broker_name)  # depends_on: condition service_healthy
    for name in profile:
        if name != broker_name:
            topology.start(name)

    greeter = next(name for name in bots if argv(profile[name])[1] == "greeter")
    greeter_env = environment(profile[greeter])
    greeter_nick = greeter_env.get("ZCHAT_NICK", "greeter")
    template = greeter_env.get("ZCHAT_GREETING", "")
    room = argv(profile[greeter])[argv(profile[greeter]).index("--room") + 1]

    watcher = topology.client("watcher")
    try:
        # The greeter is ready once it is in the room.
        deadline = time.monotonic() + WAIT
        while not any(info.name == room and info.members >= 1 for info in watcher.rooms()):
            assert topology.procs[greeter].poll() is None, topology.log(greeter)
            assert time.monotonic() < deadline, f"the greeter never joined #{room}:\n{topology.log(greeter)}"
        watcher.join(room)
        assert greeter_nick in watcher.who(room)
        # A joiner in the instant between the greeter's join and its subscription taking
        # effect would not be greeted; a newcomer after that always is.
        greeting: Event | None = None
        for attempt in range(3):
            nick = f"newcomer{attempt}"
            newcomer = topology.client(nick)
            try:
                newcomer.join(room, history=0)
                try:
                    greeting = next_event(newcomer, lambda e, n=nick: is_greeting(e, greeter_nick, n), 2.5)
                except (AssertionError, TimeoutError):
                    continue
            finally:
                newcomer.close()
            break
        assert greeting is not None, f"no greeting:\n{topology.log(greeter)}"
        assert greeting.text == template.format(nick=nick, room=room)
        assert greeting.room == room
    finally:
        watcher.close()
    for name in profile:
        if name != broker_name:
            assert topology.stop(name, seconds(profile[name].get("stop_grace_period", "10s"))) == 0
    assert topology.stop(broker_name, seconds(broker.get("stop_grace_period", "10s"))) == 0


# -- docker-compose.secure.yml: the same services with CURVE -----------------------------------

SECURE_FILE = REPO / "docker-compose.secure.yml"


def secure_override() -> dict[str, Any]:
    data = yaml.safe_load(SECURE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _mount_target(mount: Any) -> str:
    return str(mount["target"]) if isinstance(mount, dict) else str(mount).split(":")[1]


def _depends(service: dict[str, Any]) -> dict[str, Any]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {target: {"condition": "service_started"} for target in depends}
    return dict(depends)


def merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A service as ``docker compose -f base -f override`` sees it (the Compose specification's
    merge rules for the keys these files use): environment and depends_on merge by key,
    volumes by mount target, anything else is replaced."""
    merged = {**base}
    for key, value in override.items():
        if key == "environment":
            merged[key] = {**environment(base), **environment(override)}
        elif key == "volumes":
            mounts = {_mount_target(m): m for m in base.get("volumes", [])}
            mounts.update({_mount_target(m): m for m in value})
            merged[key] = list(mounts.values())
        elif key == "depends_on":
            merged[key] = {**_depends(base), **_depends(override)}
        else:
            merged[key] = value
    return merged


def secure_services() -> dict[str, dict[str, Any]]:
    base, override = services(), secure_override()["services"]
    return {name: merge_service(base.get(name, {}), override.get(name, {})) for name in {*base, *override}}


def secure_volumes() -> dict[str, Any]:
    return {**(compose().get("volumes") or {}), **(secure_override().get("volumes") or {})}


def test_the_secure_override_follows_the_compose_specification() -> None:
    data = secure_override()
    assert not {key for key in data if key not in TOP_LEVEL_KEYS and not key.startswith("x-")}
    every = secure_services()
    declared = secure_volumes()
    for name, service in data["services"].items():
        assert re.fullmatch(r"[a-zA-Z0-9._-]+", name)
        assert not {key for key in service if key not in SERVICE_KEYS and not key.startswith("x-")}
        if name not in services():
            assert build_target(service) in stages(), f"{name} is new here, so it must say how it is built"
        if "restart" in service:
            assert RESTART_POLICIES.fullmatch(service["restart"])
    for name, service in every.items():
        for target, how in _depends(service).items():
            assert target in every and target != name
            assert how["condition"] in DEPENDS_ON_CONDITIONS
        for mount in service.get("volumes", []):
            source = mount["source"] if isinstance(mount, dict) else str(mount).split(":")[0]
            assert source.startswith(("/", ".", "~", "$")) or source in declared, f"{name}: undeclared {source}"


@pytest.mark.parametrize("name", sorted(secure_services()))
def test_each_secure_service_runs_an_installed_program_and_reads_what_it_is_given(name: str) -> None:
    service = secure_services()[name]
    command = argv(service)
    module = importlib.import_module(require_script(command[0]).module)
    if command[0] == "zchat-bot":
        module.build_parser(module.find_target(command[1])).parse_args(command[1:])
    else:
        module.build_parser().parse_args(command[1:])
    set_here = {key for key in environment(service) if key.startswith("ZCHAT_")}
    unknown = set_here - env_names_read(command)
    assert not unknown, f"{name} sets variables {command[0]} never reads: {unknown}"


def _keygen() -> tuple[str, argparse.Namespace]:
    found = [(name, svc) for name, svc in secure_services().items() if argv(svc)[:1] == ["zchat-keygen"]]
    assert len(found) == 1, "one service makes the keys"
    name, service = found[0]
    keygen = importlib.import_module(require_script("zchat-keygen").module)
    return name, keygen.build_parser().parse_args(argv(service)[1:])


def test_the_secure_override_wires_the_keys_together() -> None:
    every = secure_services()
    keygen_name, keygen = _keygen()
    assert keygen.exist_ok, "keygen runs at every `up`: it must keep the keys it made before"
    key_dir, authorized = str(keygen.dir), str(keygen.authorize)
    broker_name = next(name for name, svc in every.items() if argv(svc)[:1] == ["zchat-broker"])
    broker = every[broker_name]
    env = environment(broker)
    assert not parse_bool(env.get("ZCHAT_INSECURE", "0")), "with CURVE the broker needs no --insecure"
    secret = env["ZCHAT_CURVE_SECRET_KEY"]
    assert secret in {f"{key_dir}/{name}.key_secret" for name in keygen.names}
    assert env["ZCHAT_AUTHORIZED_KEYS"] == authorized
    server_public = secret.removesuffix("_secret")
    assert _depends(broker).get(keygen_name, {}).get("condition") == "service_completed_successfully"
    volume_of = {}
    for name, service in every.items():
        for mount in service.get("volumes", []):
            parts = str(mount).split(":")
            if key_dir.startswith(parts[1]):
                volume_of[name] = parts[0]
                assert name == keygen_name or parts[2:] == ["ro"], f"{name} needs only to read the keys"
    clients = [name for name, svc in every.items() if argv(svc)[:1] in (["zchat-client"], ["zchat-bot"])]
    assert clients
    for name in clients:
        client_env = environment(every[name])
        assert client_env["ZCHAT_SERVER_KEY"] == server_public, f"{name} must know the broker's public key"
        own = client_env["ZCHAT_KEY"]
        assert own in {f"{key_dir}/{n}.key_secret" for n in keygen.names} and own != secret
    assert len(set(volume_of.values())) == 1 and set(volume_of) == {keygen_name, broker_name, *clients}
    assert set(volume_of.values()) <= set(secure_volumes())
    # The volume's mount point exists in the images, owned by the user the services run as,
    # so a fresh volume is writable by keygen (Docker copies the directory's owner and mode).
    for target in {build_target(every[name]) for name in volume_of}:
        runs = " ".join(rest for kw, rest in instructions(target) if kw == "RUN")
        assert re.search(rf"install -d -o zchat -g zchat -m 0?700 {re.escape(key_dir)}\b", runs), target


@pytest.mark.timeout(40)
def test_the_secure_variant_runs_its_services_over_curve(tmp_path: Path) -> None:
    every = secure_services()
    container_ports = sorted({int(p.group("container")) for svc in every.values() for p in published(svc)})
    keygen_name, keygen = _keygen()
    (tmp_path / "keys").mkdir(mode=0o700)
    topology = Topology(tmp_path, dict(zip(container_ports, free_ports(len(container_ports)), strict=True)),
                        spec=every, mounts={str(keygen.dir): tmp_path / "keys"})
    try:
        assert topology.start(keygen_name).wait(timeout=WAIT) == 0, topology.log(keygen_name)
        broker_name = next(name for name, svc in every.items() if argv(svc)[:1] == ["zchat-broker"])
        topology.start(broker_name)
        wait_healthy(topology, broker_name)  # the HEALTHCHECK works with CURVE on
        greeter = next(name for name, svc in every.items() if argv(svc)[:2] == ["zchat-bot", "greeter"])
        topology.start(greeter)
        you = topology.client("you")
        try:
            deadline = time.monotonic() + WAIT
            while not any(info.name == "general" and info.members >= 1 for info in you.rooms()):
                assert topology.procs[greeter].poll() is None, topology.log(greeter)
                assert time.monotonic() < deadline, f"the greeter never joined:\n{topology.log(greeter)}"
            you.join("general", history=0)
            assert "greeter" in you.who("general")
        finally:
            you.close()
        # Keygen again (every `up` runs it): it keeps the keys, so the broker still knows them.
        assert topology.start(keygen_name).wait(timeout=WAIT) == 0, topology.log(keygen_name)
        for name in (greeter, broker_name):
            assert topology.stop(name, seconds(every[name].get("stop_grace_period", "10s"))) == 0
    finally:
        for proc in topology.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
