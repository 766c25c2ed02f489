"""The deployment files against their schemas and against the code: deploy/compose.yaml through
`docker-compose config`, the Kubernetes manifests through kubernetes-validate's bundled API schemas
(KubeRay's RayCluster by its required fields, its pod templates as core PodTemplates), and every `qvl`
command, QVL_* variable, settings file and port they use through the code that would read them."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import ROOT

from qvl.cli import parse_command
from qvl.settings import RouterSettings, Settings, load_settings

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"
COMPOSE_ENV = {"QVL_API_KEYS": "test-key", "PATH": "/usr/bin:/bin"}


def matching(folder: Path, pattern: str) -> list[Path]:
    """The files of `folder` matching `pattern`, sorted; fails when there are none (a moved folder or a
    renamed suffix must not turn the tests that loop over them into tests of nothing)."""
    paths = sorted(folder.glob(pattern))
    assert paths, f"no {pattern} in {folder}"
    return paths


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in matching(DEPLOY / "k8s", "*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed; `make install` installs it (apt-get install docker-compose)")
    return binary


# -- schemas ------------------------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    done = subprocess.run(
        [docker_compose(), "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=COMPOSE_ENV,
    )
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_start_without_api_keys() -> None:
    done = subprocess.run(
        [docker_compose(), "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0 and "QVL_API_KEYS" in done.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    # The check above can fail: an unknown service option is refused.
    broken = compose()
    broken["services"]["router"]["replicaz"] = 2
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    done = subprocess.run(
        [docker_compose(), "-f", str(path), "config", "-q"], capture_output=True, text=True, env=COMPOSE_ENV
    )
    assert done.returncode != 0 and "replicaz" in done.stderr


def test_compose_reserves_one_gpu_per_replica() -> None:
    services = compose()["services"]
    gpus = {}
    for name in ("replica-0", "replica-1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        gpus[name] = tuple(device["device_ids"])
    assert len(set(gpus.values())) == 2


@pytest.mark.parametrize(("source", "doc"), [d for d in k8s_docs() if d[1]["kind"] != "RayCluster"])
def test_kubernetes_manifest_matches_its_api_schema(source: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_an_unknown_field() -> None:
    (deployment,) = [d for name, d in k8s_docs() if name == "router.yaml" and d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["qvl"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def ray_cluster() -> dict[str, Any]:
    (doc,) = [d for _, d in k8s_docs() if d["kind"] == "RayCluster"]
    return doc


def test_raycluster_has_kuberays_required_fields_and_valid_pod_templates() -> None:
    doc = ray_cluster()
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["rayVersion"] == _pinned("ray")
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        assert isinstance(group.get("rayStartParams", {}), dict)
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), name
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": group["template"],
        }
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1


# -- the files against the code -------------------------------------------------------------------


def qvl_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `qvl`) of every qvl command in compose and the Kubernetes manifests."""
    found = []
    for name, service in compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[0] == "qvl":
            found.append((f"compose:{name}", command[1:]))
    for source, doc in k8s_docs():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            argv = container.get("command", []) + container.get("args", [])
            if argv and argv[0] == "qvl":
                found.append((f"{source}:{container['name']}", argv[1:]))
    return found


def config_maps(tmp_path: Path) -> dict[str, Path]:
    """Every settings file of the ConfigMaps, written out as the pods see it (mount path -> local file)."""
    files = {}
    for _, doc in k8s_docs():
        if doc["kind"] == "ConfigMap":
            for key, text in doc["data"].items():
                local = tmp_path / key
                local.write_text(text)
                files[f"/etc/qvl/{key}"] = local
    return files


def test_every_qvl_command_parses_and_its_settings_load(tmp_path: Path) -> None:
    commands = qvl_commands()
    assert {where.split(":")[0] for where, _ in commands} >= {"compose", "router.yaml", "cluster-up-job.yaml"}
    mounted = config_maps(tmp_path)
    for where, argv in commands:
        argv = [str(mounted.get(a, a)) for a in argv]
        args, settings = parse_command(argv)  # unknown flags exit, bad values raise
        assert args.handler is not None, where
        if args.command == "cluster":
            assert settings.registry.url, f"{where}: cluster replicas must announce to a registry"


def setting_exists(path: list[str]) -> bool:
    model: Any = Settings
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return True


def test_every_qvl_variable_names_a_setting() -> None:
    names = set()
    for service in compose()["services"].values():
        names |= {k for k in service.get("environment", {}) if k.startswith("QVL_")}
    for _, doc in k8s_docs():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            names |= {e["name"] for e in container.get("env", []) if e["name"].startswith("QVL_")}
        for group in doc.get("spec", {}).get("workerGroupSpecs", []):
            for container in group["template"]["spec"]["containers"]:
                names |= {e["name"] for e in container.get("env", []) if e["name"].startswith("QVL_")}
    assert {"QVL_API_KEYS", "QVL_ROUTER__QUOTA__BACKEND", "QVL_REPLICA__RUN_DIR"} <= names
    for name in names:
        assert setting_exists(name.removeprefix("QVL_").lower().split("__")), name
    assert not setting_exists(["router", "replicaz"])


def test_example_cluster_configs_load() -> None:
    for path in matching(DEPLOY / "ray", "*.yaml"):
        load_settings(path)


def test_a_glob_that_matches_nothing_fails(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"no \*\.yaml in"):
        matching(tmp_path, "*.yaml")


def test_ports_agree_across_the_files(tmp_path: Path) -> None:
    services = compose()["services"]
    router_argv = dict(a.split("=", 1) for a in services["router"]["command"][2:] if "=" in a)
    port = int(router_argv["--port"])
    assert services["router"]["ports"] == [f"{port}:{port}"]
    routers = _targets("routers")
    assert routers == [f"router:{port}"]
    for name in ("replica-0", "replica-1"):
        replica_port = int(dict(a.split("=", 1) for a in services[name]["command"][2:] if "=" in a)["--port"])
        assert f"{name}:{replica_port}" in _targets("vllm")
        assert f"http://{name}:{replica_port}" in router_argv.values() or any(
            a == f"--replica=http://{name}:{replica_port}" for a in services["router"]["command"]
        )
        assert f":{replica_port}/health" in " ".join(services[name]["healthcheck"]["test"])
    exporter = dict(a.split("=", 1) for a in services["gpu-exporter"]["command"][2:] if "=" in a)
    assert _targets("gpu") == [f"gpu-exporter:{exporter['--port']}"]

    # Kubernetes: the router's settings file, its container port, Service and scrape annotation.
    mounted = config_maps(tmp_path)
    router_settings = load_settings(mounted["/etc/qvl/settings.yaml"]).router
    (deployment,) = [d for n, d in k8s_docs() if n == "router.yaml" and d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    (container_port,) = pod["spec"]["containers"][0]["ports"]
    assert container_port["containerPort"] == router_settings.port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(router_settings.port)
    assert router_settings.host == "0.0.0.0"

    # The cluster-up job reaches the head Service KubeRay creates, on the Ray Client port it exposes.
    job_argv = next(argv for where, argv in qvl_commands() if where.startswith("cluster-up-job.yaml"))
    address = job_argv[job_argv.index("--address") + 1]
    head = ray_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    assert address == f"ray://{ray_cluster()['metadata']['name']}-head-svc:{client_port}"

    # nginx: upstreams on the router port; body size and read timeout no tighter than the router's.
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", nginx, re.MULTILINE)
    assert len(upstreams) >= 2 and {int(p) for _, p in upstreams} == {RouterSettings().port}
    body_mb = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))  # type: ignore[union-attr]
    assert body_mb * 1024 * 1024 == RouterSettings().max_request_bytes
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1))  # type: ignore[union-attr]
    assert read_timeout > RouterSettings().request_timeout_s


# -- Redis: a primary, a replica, three sentinels; every client goes through the sentinels ---------

REDIS_URL = re.compile(r"\b(?:redis|rediss|redis\+sentinel|unix)://[^\s'\"]+")


@dataclass(frozen=True)
class SentinelSetup:
    """What one deployment's sentinels are: their addresses, and the config each writes at start."""

    addresses: frozenset[str]
    """host:port of every sentinel, as clients must name them."""
    configs: dict[str, dict[str, list[str]]]
    """sentinel host -> its config lines by directive (`sentinel monitor` -> its arguments, ...)."""


def sentinel_config(script: str, environment: dict[str, str]) -> dict[str, list[str]]:
    """The config a sentinel's start script writes (its heredoc), with `$VAR`/`${VAR}` from `environment`:
    directive (`port`, `sentinel monitor`, ...) -> its arguments."""
    body = re.search(r"<<EOF\n(.*?)\nEOF\n", script, re.DOTALL)
    assert body is not None, "a sentinel's command must write its config with a heredoc"
    text = re.sub(r"\$\$?\{?(\w+)\}?", lambda m: environment[m.group(1)], body.group(1))
    config: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        name = 2 if words[0] == "sentinel" else 1
        directive = " ".join(words[:name])
        assert directive not in config, f"{directive} given twice"
        config[directive] = words[name:]
    return config


def compose_sentinels() -> SentinelSetup:
    services = compose()["services"]
    configs = {}
    for name, service in services.items():
        command = service.get("command")
        if isinstance(command, list) and "--sentinel" in command[-1]:
            configs[name] = sentinel_config(command[-1], service.get("environment", {}))
    addresses = frozenset(f"{name}:{config['port'][0]}" for name, config in configs.items())
    return SentinelSetup(addresses, configs)


def k8s_sentinels() -> SentinelSetup:
    (sts,) = [d for _, d in k8s_docs() if d["kind"] == "StatefulSet" and "sentinel" in d["metadata"]["name"]]
    spec = sts["spec"]
    (service,) = [d for _, d in k8s_docs() if d["kind"] == "Service" and d["metadata"]["name"] == spec["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "pods get DNS names only from a headless Service"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    configs = {}
    for i in range(spec["replicas"]):
        pod = f"{sts['metadata']['name']}-{i}"
        host = f"{pod}.{spec['serviceName']}"
        config = sentinel_config(container["command"][-1], {"HOSTNAME": pod})
        (port,) = [p["port"] for p in service["spec"]["ports"]]
        assert config["port"] == [str(port)], "the Service's port must be the one the sentinels listen on"
        configs[host] = config
    addresses = frozenset(f"{host}:{config['port'][0]}" for host, config in configs.items())
    return SentinelSetup(addresses, configs)


def redis_args(argv: list[str]) -> dict[str, list[str]]:
    """A redis-server command line's options: `--replicaof H P` -> {"replicaof": ["H", "P"]}."""
    options: dict[str, list[str]] = {}
    name = ""
    for arg in argv:
        if arg.startswith("--"):
            name = arg.removeprefix("--")
            options[name] = []
        elif name:
            options[name].append(arg)
    return options


def compose_redis() -> dict[str, dict[str, list[str]]]:
    """Every redis-server service of compose (not the sentinels): name -> its options."""
    return {
        name: redis_args(service["command"])
        for name, service in compose()["services"].items()
        if isinstance(service.get("command"), list) and service["command"][0] == "redis-server"
    }


def k8s_redis() -> dict[str, dict[str, list[str]]]:
    """Every Redis Service of the manifests that fronts a redis-server: Service name -> its pod's options."""
    found = {}
    deployments = [d for _, d in k8s_docs() if d["kind"] == "Deployment"]
    for _, service in k8s_docs():
        if service["kind"] != "Service":
            continue
        for deployment in deployments:
            pod = deployment["spec"]["template"]
            if service["spec"].get("selector", {}).items() <= pod["metadata"]["labels"].items():
                (container,) = pod["spec"]["containers"]
                if container["image"].startswith("redis:"):
                    options = redis_args(container["args"])
                    (port,) = service["spec"]["ports"]
                    assert [str(port["port"])] == options["port"] == [str(container["ports"][0]["containerPort"])]
                    found[service["metadata"]["name"]] = options
    return found


def check_primary_and_replica(servers: dict[str, dict[str, list[str]]], sentinels: SentinelSetup) -> None:
    """One primary, one replica of it; each announces its own name (what Sentinel hands to clients after
    a failover); every sentinel monitors the primary by that name and port, quorum a majority."""
    primaries = [name for name, options in servers.items() if "replicaof" not in options]
    replicas = [name for name, options in servers.items() if "replicaof" in options]
    assert len(primaries) == 1 and len(replicas) >= 1, servers
    (primary,) = primaries
    for name in replicas:
        assert servers[name]["replicaof"] == [primary, *servers[primary]["port"]], name
    for name, options in servers.items():
        assert options["replica-announce-ip"] == [name], f"{name} must announce its own name"
        assert options["save"] == [""] and options["appendonly"] == ["no"]
    assert len(sentinels.configs) == 3
    for host, config in sentinels.configs.items():
        master, address, port, quorum = config["sentinel monitor"]
        assert (address, port) == (primary, servers[primary]["port"][0]), host
        assert int(quorum) == 2, "two of the three sentinels must agree the primary is down"
        assert config["sentinel resolve-hostnames"] == config["sentinel announce-hostnames"] == ["yes"], host
        assert config["sentinel announce-ip"] == [host], f"{host} must announce its own, stable name"
        for directive in ("down-after-milliseconds", "failover-timeout", "parallel-syncs"):
            assert config[f"sentinel {directive}"][0] == master, directive
    assert len({tuple(c["sentinel monitor"]) for c in sentinels.configs.values()}) == 1


def check_sentinel_url(url: str, sentinels: SentinelSetup, where: str) -> None:
    """`url` asks every one of `sentinels` for the primary of the service they monitor."""
    match = re.fullmatch(r"redis\+sentinel://([^/]+)/([\w.-]+)/(\d+)", url)
    assert match is not None, f"{where}: {url} is not redis+sentinel://H1:P1,H2:P2,H3:P3/SERVICE/DB"
    hosts, service, _ = match.groups()
    assert frozenset(hosts.split(",")) == sentinels.addresses, f"{where}: {url} must name every sentinel"
    monitored = {config["sentinel monitor"][0] for config in sentinels.configs.values()}
    assert monitored == {service}, f"{where}: the sentinels monitor {monitored}, not {service}"


def test_compose_runs_redis_as_a_primary_a_replica_and_three_sentinels() -> None:
    services = compose()["services"]
    servers = compose_redis()
    assert set(servers) == {"redis-primary", "redis-replica"}
    sentinels = compose_sentinels()
    assert set(sentinels.configs) == {"sentinel-1", "sentinel-2", "sentinel-3"}
    check_primary_and_replica(servers, sentinels)
    for name in sentinels.configs:
        # Sentinel rewrites its config: the file must be written at start, not mounted read-only.
        assert not services[name].get("volumes"), name
        assert services[name]["image"] == services["redis-primary"]["image"]
    assert set(services["router"]["depends_on"]) >= set(sentinels.configs)


def test_kubernetes_runs_redis_as_a_primary_a_replica_and_three_sentinels() -> None:
    servers = k8s_redis()
    assert set(servers) == {"redis-primary", "redis-replica"}
    check_primary_and_replica(servers, k8s_sentinels())


def test_every_redis_url_asks_all_three_sentinels(tmp_path: Path) -> None:
    sentinels = compose_sentinels()
    router = compose()["services"]["router"]
    urls = REDIS_URL.findall(yaml.safe_dump(router, width=1000))
    assert len(urls) == 2  # the answer cache (--cache) and the quota buckets
    for url in urls:
        check_sentinel_url(url, sentinels, "compose")

    sentinels = k8s_sentinels()
    k8s_urls = [url for _, doc in k8s_docs() for url in REDIS_URL.findall(yaml.safe_dump(doc, width=1000))]
    assert k8s_urls and all(url.startswith("redis+sentinel://") for url in k8s_urls), k8s_urls
    checked = 0
    for where, local in config_maps(tmp_path).items():
        settings = load_settings(local)
        for url in (settings.registry.url, settings.cache.backend, settings.router.quota.backend):
            if url not in ("", "memory", "off"):
                check_sentinel_url(url, sentinels, where)
                checked += 1
    assert checked == len(k8s_urls) == 4  # the router's registry, cache and quotas; the cluster's registry


def test_a_url_missing_a_sentinel_or_naming_another_service_is_refused() -> None:
    sentinels = compose_sentinels()
    good = "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/qvl-primary/0"
    check_sentinel_url(good, sentinels, "test")
    for bad in (
        "redis://redis-primary:6379/0",
        "redis+sentinel://sentinel-1:26379,sentinel-2:26379/qvl-primary/0",
        "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26380/qvl-primary/0",
        "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/mymaster/0",
    ):
        with pytest.raises(AssertionError):
            check_sentinel_url(bad, sentinels, "test")


def test_compose_prometheus_keeps_the_job_names_and_passes_promtool(tmp_path: Path) -> None:
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    in_compose = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    names = [job["job_name"] for job in in_compose["scrape_configs"]]
    assert names == [job["job_name"] for job in shipped["scrape_configs"]]
    # Laid out as the compose file mounts it: /etc/prometheus/{prometheus.yml,rules,targets}.
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(DEPLOY / "prometheus" / "rules", tmp_path / "rules")
    shutil.copytree(DEPLOY / "compose" / "targets", tmp_path / "targets")
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing; `make install` installs prometheus"
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _targets(job: str) -> list[str]:
    groups = yaml.safe_load((DEPLOY / "compose" / "targets" / job / "compose.json").read_text())
    return [t for group in groups for t in group["targets"]]


def _pinned(package: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{package}==([\d.]+)"', text)
    assert match is not None
    return match.group(1)
