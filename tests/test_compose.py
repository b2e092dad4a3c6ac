"""The deployment infrastructure, checked structurally: Docker and Kubernetes do not run here.

infra/docker-compose.yml is read the way `docker compose --env-file infra/.env` reads it (YAML, then
compose's variable interpolation, simulated below), and the bucket service's shell script runs under
/bin/sh against a stand-in `mc`. The Dockerfile and .dockerignore are parsed. The gpu work pool's
Kubernetes base job template is validated and rendered by Prefect's own code."""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "infra/docker-compose.yml"
ENV_EXAMPLE = REPO / "infra/.env.example"
JOB_TEMPLATE = REPO / "infra/work-pools/gpu-kubernetes.json"

ONE_SHOT = {"create-bucket", "pools"}
WORKERS = {"worker": "local-process", "gpu-worker": "gpu"}
# Secrets that infra/.env must provide, with values unlike any default.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-Pass/w0rd@team",
    "MINIO_ROOT_USER": "team-store-admin",
    "MINIO_ROOT_PASSWORD": "Store-S3cret-91",
    "PREFECT_API_AUTH_STRING": "ops:Str0ng-pass",
}
CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|MINIO_ROOT_USER")


# ----- compose's variable interpolation ---------------------------------------------------------


class InterpolationError(ValueError):
    """An interpolation compose refuses: a bad `$` or a `${VAR:?message}` with VAR missing."""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.DOTALL)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of one string: `$$` is a literal `$`; `$VAR` and `${VAR}` are VAR's
    value (empty when unset); `${VAR:-default}` / `${VAR-default}` fall back when VAR is unset or empty
    / unset; `${VAR:?err}` / `${VAR?err}` fail likewise; `${VAR:+alt}` / `${VAR+alt}` give alt when
    set. Any other `$` is an error, as in compose."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "{":
            depth, end = 1, i + 2
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if depth:
                raise InterpolationError(f"unterminated ${{ in {text!r}")
            out.append(_braced(text[i + 2 : end - 1], env))
            i = end
        elif name := _NAME.match(text, i + 1):
            out.append(env.get(name.group(), ""))
            i = name.end()
        else:
            raise InterpolationError(f"invalid interpolation format in {text!r}: a lone '$'")
    return "".join(out)


def _braced(body: str, env: Mapping[str, str]) -> str:
    match = _BRACED.fullmatch(body)
    if not match:
        raise InterpolationError(f"invalid interpolation format: ${{{body}}}")
    name, operator, argument = match.groups()
    value = env.get(name)
    present = value is not None and (value != "" or not (operator or "").startswith(":"))
    if operator is None:
        return value or ""
    if operator.endswith("-"):
        return value if present else interpolate(argument, env)
    if operator.endswith("?"):
        if not present:
            raise InterpolationError(f"required variable {name} is missing a value: {argument}")
        return value
    return interpolate(argument, env) if present else ""


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of the parsed file (compose leaves keys alone)."""
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return resolve(raw_compose(), SECRETS if env is None else env)


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, comments and blank lines skipped, one pair of surrounding quotes removed."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def referenced_variables(text: str) -> set[str]:
    """Names compose interpolates in the raw file: `${NAME...}` or `$NAME`, not after `$$`."""
    names = set()
    for match in re.finditer(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)|[A-Za-z_][A-Za-z0-9_]*)", text):
        token = match.group(1)
        if token != "$":
            names.add(match.group(2) or token)
    return names


def test_the_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$HOME ${SET} $SET ${UNSET}", env) == "$HOME x x "
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET:-${SET}}", env) == "d  d x"
    assert interpolate("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt}", env) == "alt  alt"
    with pytest.raises(InterpolationError, match="EMPTY is missing a value: why"):
        interpolate("${EMPTY:?why}", env)
    assert interpolate("${EMPTY?why}", env) == ""
    for bad in ("$((1 + 1))", "cost: 5$", "${SET", "${1BAD}"):
        with pytest.raises(InterpolationError):
            interpolate(bad, env)


# ----- docker-compose.yml ------------------------------------------------------------------------


def _pinned(reference: str) -> bool:
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag or "@" in reference:
        return "@sha256:" in reference
    return tag != "latest" and (re.search(r"\d+\.\d+", tag) is not None or tag.startswith("RELEASE."))


def test_every_image_is_pinned():
    services = compose()["services"]
    for env_name, env in (("defaults", SECRETS), ("infra/.env.example", env_file(ENV_EXAMPLE))):
        for name, service in compose(env)["services"].items():
            image = service.get("image")
            assert image, f"{name} has no image: compose would name it after the folder, untagged"
            assert _pinned(image), f"{name}: image {image!r} ({env_name}) is not pinned to a release"
    # The project's image is built here; its tag still says which build it is.
    assert {name for name, s in services.items() if "build" in s} == {"pools", "worker", "gpu-worker"}
    assert services["prefect-server"]["image"] == "prefecthq/prefect:3.9.1-python3.11"


def test_the_prefect_server_image_matches_the_installed_client():
    import prefect

    tag = compose()["services"]["prefect-server"]["image"].rpartition(":")[2]
    assert tag.split("-")[0] == prefect.__version__


def test_the_bucket_script_uses_the_env_file_credentials(tmp_path):
    """With credentials other than any default, the script that runs in the mc container (after
    compose turned `$$` into `$`) passes exactly those to `mc alias set`, reading them from its own
    environment; then it creates the bucket."""
    service = compose()["services"]["create-bucket"]
    script = service["command"][0]
    env = environment(service)
    assigned = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=", script, re.MULTILINE))
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", script))
    assert used - assigned <= set(env), f"the script reads {sorted(used - assigned - set(env))} unset"

    calls = _run_bucket_script(tmp_path, service, mc_alias_exit=0)
    assert calls[0] == [
        "alias", "set", "local", "http://minio:9000",
        SECRETS["MINIO_ROOT_USER"], SECRETS["MINIO_ROOT_PASSWORD"],
    ]  # fmt: skip
    assert calls[-1] == ["mb", "--ignore-existing", "local/dalle"]


def test_bucket_creation_ends_with_an_error_when_minio_refuses(tmp_path):
    service = compose()["services"]["create-bucket"]
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _run_bucket_script(tmp_path, service, mc_alias_exit=1)
    calls = json.loads(failed.value.output)
    assert 1 < len(calls) <= 60 and all(call[:2] == ["alias", "set"] for call in calls)
    assert "giving up" in failed.value.stderr
    assert service.get("restart", "no") == "no", "a restart policy would retry a failed bucket forever"


def _run_bucket_script(tmp_path: Path, service: dict[str, Any], mc_alias_exit: int) -> list[list[str]]:
    """Run the service's entrypoint + command with only its environment, `mc` and `sleep` stubbed."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "mc-calls"
    log.write_text("")
    programs = {
        "mc": f'printf "%s\\n" "$#" "$@" >> {log}\n[ "$1" = alias ] && exit {mc_alias_exit}\nexit 0\n',
        "sleep": "exit 0\n",
    }
    for program, body in programs.items():
        path = stubs / program
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    assert service["entrypoint"][0] == "/bin/sh"
    run = subprocess.run(
        [*service["entrypoint"], *service["command"]],
        env={**environment(service), "PATH": f"{stubs}:/usr/bin:/bin"}, check=False,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines, calls = log.read_text().splitlines(), []
    while lines:
        count = int(lines.pop(0))
        calls.append(lines[:count])
        del lines[:count]
    if run.returncode:
        raise subprocess.CalledProcessError(run.returncode, "create-bucket", json.dumps(calls), run.stderr)
    return calls


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_a_missing_secret_stops_compose(secret):
    env = {k: v for k, v in SECRETS.items() if k != secret}
    with pytest.raises(InterpolationError, match=rf"{secret} is missing a value: .*infra/\.env"):
        compose(env)
    with pytest.raises(InterpolationError, match=secret):
        compose({**env, secret: ""})


def test_no_service_has_default_credentials():
    raw, resolved = raw_compose()["services"], compose()["services"]
    assert "minioadmin" not in COMPOSE_FILE.read_text()
    for name, service in raw.items():
        for key, value in environment(service).items():
            if not CREDENTIAL_KEY.search(key):
                continue
            required = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", value)
            assert required, f"{name}.{key} = {value!r}: a credential must come from infra/.env, no default"
            assert environment(resolved[name])[key] == SECRETS[required.group(1)]


def test_the_server_requires_the_auth_string_the_clients_send():
    services = compose()["services"]
    server = environment(services["prefect-server"])
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == SECRETS["PREFECT_API_AUTH_STRING"]
    for name in ("pools", *WORKERS):
        client = environment(services[name])
        assert client["PREFECT_API_AUTH_STRING"] == SECRETS["PREFECT_API_AUTH_STRING"], name
        assert client["PREFECT_API_URL"] == "http://prefect-server:4200/api", name


def test_every_prefect_setting_named_exists_in_the_installed_prefect():
    import prefect.settings

    for name, service in raw_compose()["services"].items():
        for key in environment(service):
            if key.startswith("PREFECT_"):
                assert hasattr(prefect.settings, key), (
                    f"{name}: {key} is no Prefect {prefect.__version__} setting"
                )


def test_prefect_reads_the_server_and_worker_settings(monkeypatch, tmp_path):
    """Prefect's own settings model, given each service's environment, sees Postgres, auth and URLs."""
    from urllib.parse import quote_plus

    from prefect.settings.models.root import Settings

    services = compose()["services"]
    for key in list(os.environ):
        if key.startswith("PREFECT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profile of this machine's user
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    with monkeypatch.context() as patch:
        for key, value in environment(services["prefect-server"]).items():
            patch.setenv(key, value)
        server = Settings()
        password = quote_plus(SECRETS["POSTGRES_PASSWORD"])
        assert server.server.database.connection_url.get_secret_value() == (
            f"postgresql+asyncpg://prefect:{password}@postgres:5432/prefect"
        )
        assert server.server.api.auth_string.get_secret_value() == SECRETS["PREFECT_API_AUTH_STRING"]
        assert server.server.ui.api_url == "http://127.0.0.1:4200/api"
    with monkeypatch.context() as patch:
        for key, value in environment(services["worker"]).items():
            patch.setenv(key, value)
        worker = Settings()
        assert worker.api.url == "http://prefect-server:4200/api"
        assert worker.api.auth_string.get_secret_value() == SECRETS["PREFECT_API_AUTH_STRING"]


def test_the_ui_api_url_defaults_to_loopback_and_can_name_the_host():
    def ui(env):
        return environment(compose(env)["services"]["prefect-server"])["PREFECT_UI_API_URL"]

    assert ui(SECRETS) == "http://127.0.0.1:4200/api"
    assert ui({**SECRETS, "PREFECT_UI_API_URL": "http://dalle.lan:4200/api"}) == "http://dalle.lan:4200/api"


def test_workers_start_only_after_what_they_depend_on_is_ready():
    services = compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: a depends_on list waits for nothing but the start"
        for target, rule in depends.items():
            condition = rule.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target}, which has no healthcheck"
                )
            else:
                assert condition == "service_completed_successfully", f"{name} -> {target}: {condition}"
                assert target in ONE_SHOT, f"{name} waits for long-running {target} to exit"
    for worker in WORKERS:
        assert services[worker]["depends_on"] == {
            "prefect-server": {"condition": "service_healthy"},
            "pools": {"condition": "service_completed_successfully"},
            "create-bucket": {"condition": "service_completed_successfully"},
        }
        seen, todo = set(), [worker]
        while todo:  # everything upstream of a worker is gated too
            for target in services[todo.pop()].get("depends_on", {}):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert seen == {"prefect-server", "postgres", "pools", "create-bucket", "minio"}
    assert services["pools"]["depends_on"] == {"prefect-server": {"condition": "service_healthy"}}
    assert services["create-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}


def test_long_running_services_have_a_healthcheck_and_a_restart_policy():
    services = compose()["services"]
    assert ONE_SHOT < set(services)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", f"one-shot {name} must not be restarted"
            continue
        assert service.get("restart") == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert "curl" not in test, f"{name}: its image may have no curl"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    server_check = " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert "python" in server_check and "http://127.0.0.1:4200/api/health" in server_check
    for worker in WORKERS:
        assert "--with-healthcheck" in services[worker]["command"]


def test_published_ports_bind_to_the_bind_address():
    raw = raw_compose()["services"]
    published = {name: s["ports"] for name, s in raw.items() if s.get("ports")}
    assert set(published) == {"prefect-server", "minio"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
    for env, address in ((SECRETS, "127.0.0.1"), ({**SECRETS, "BIND_ADDRESS": "10.1.2.3"}, "10.1.2.3")):
        for name, service in compose(env)["services"].items():
            for port in service.get("ports", []):
                assert port.split(":")[0] == address, f"{name}: {port}"
            assert service.get("network_mode") != "host", name


def test_workers_poll_their_pools_with_the_stack_s_s3_settings():
    services = compose()["services"]
    for name, pool in WORKERS.items():
        command = services[name]["command"]
        assert command[:3] == ["prefect", "worker", "start"]
        assert command[command.index("--pool") + 1] == pool
        assert command[command.index("--type") + 1] == "process"
        assert "--no-create-pool-if-not-found" in command, "the pools service creates the pools"
        env = environment(services[name])
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == SECRETS["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"]
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert services["pools"]["command"].split() == ["dalle", "pools"]
    with_kubernetes = compose({**SECRETS, "DALLE_POOLS_ARGS": "--gpu-kubernetes"})["services"]["pools"]
    assert with_kubernetes["command"].split() == ["dalle", "pools", "--gpu-kubernetes"]


def test_the_gpu_worker_runs_under_its_profile_on_nvidia_gpus():
    services = compose()["services"]
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert all("profiles" not in s for name, s in services.items() if name != "gpu-worker")
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert gpu["build"]["context"] == services["worker"]["build"]["context"] == ".."
    assert gpu["build"]["dockerfile"] == "Dockerfile"
    assert gpu["build"]["args"]["TORCH_SPEC"].startswith("torch==")
    assert gpu["image"] != services["worker"]["image"], "the GPU build must not overwrite the CPU one"
    assert "shm_size" in gpu


def test_the_env_example_lists_every_variable_with_compose_s_defaults():
    text = COMPOSE_FILE.read_text()
    example = env_file(ENV_EXAMPLE)
    assert referenced_variables(text) == set(example), "infra/.env.example and the compose file differ"
    assert set(SECRETS) <= set(example)
    for secret in SECRETS:
        assert "change-me" in example[secret], f"{secret} in the example must be a placeholder"
    for name, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", text):
        assert example[name] == default, f"copying the example changes {name} from {default!r}"
    compose(example)  # resolves without error
    assert "cp infra/.env.example infra/.env" in ENV_EXAMPLE.read_text()


# ----- Dockerfile and .dockerignore --------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_has_no_entrypoint_and_holds_the_code_and_infra():
    instructions = _dockerfile_instructions()
    assert not [args for op, args in instructions if op == "ENTRYPOINT"], "a worker's command must run as is"
    assert [json.loads(args) for op, args in instructions if op == "CMD"] == [["dalle", "--help"]]
    assert [args for op, args in instructions if op == "WORKDIR"] == ["/opt/dalle"]
    copied = {args.split()[0] for op, args in instructions if op == "COPY"}
    assert {"dalle", "flows", "demo", "configs", "infra"} <= copied
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or one of its parents."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_environments_runs_and_secrets_out_of_the_build():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/demo/config.yaml", ".git/HEAD",
        "dalle/__pycache__/config.cpython-311.pyc", "dalle/config.pyc", ".pytest_cache/v/cache",
        ".ruff_cache/CACHEDIR.TAG", "dalle_pipeline.egg-info/PKG-INFO", "test-artifacts/report.xml",
        "infra/.env", "build/lib/dalle/__init__.py",
    ):  # fmt: skip
        assert _dockerignored(path, patterns), f"{path} would be sent to the build"
    copied = [args.split()[0] for op, args in _dockerfile_instructions() if op == "COPY"]
    for source in copied:
        files = [source] if (REPO / source).is_file() else [
            str(p.relative_to(REPO)) for p in (REPO / source).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]  # fmt: skip
        assert files, source
        for path in files:
            assert not _dockerignored(path, patterns), f"{path} is copied into the image but ignored"
    assert not _dockerignored("infra/.env.example", patterns)


# ----- the gpu pool's Kubernetes base job template -----------------------------------------------


def _template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text())


def _defaults(template: dict[str, Any]) -> dict[str, Any]:
    """What a worker fills in first: every variable's default that is not None."""
    properties = template["variables"]["properties"]
    return {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}


def _container(job_configuration: dict[str, Any]) -> dict[str, Any]:
    (container,) = job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_job_template_validates_as_a_work_pool_base_job_template():
    """The server's WorkPoolCreate runs Prefect's base_job_template validator (the client's model
    takes any dict); a placeholder without a variable fails it, so the check is real."""
    from prefect.client.schemas.actions import WorkPoolCreate as ClientWorkPoolCreate
    from prefect.server.schemas.actions import WorkPoolCreate
    from pydantic import ValidationError

    template = _template()
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)
    ClientWorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValidationError, match="gpu_count"):
        WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=broken)


def test_the_job_template_extends_prefect_s_stock_kubernetes_template():
    import prefect.server.api

    registry = (
        Path(prefect.server.api.__file__).parent / "collections_data/views/aggregate-worker-metadata.json"
    )
    if not registry.exists():
        pytest.skip("this Prefect has no bundled worker metadata")
    stock = next(
        worker["default_base_job_configuration"]
        for collection in json.loads(registry.read_text()).values()
        for worker in collection.values()
        if worker.get("type") == "kubernetes"
    )
    template = _template()
    assert set(stock["job_configuration"]) <= set(template["job_configuration"])
    assert set(stock["variables"]["properties"]) <= set(template["variables"]["properties"])
    for key in ("command", "env", "labels", "name", "namespace"):
        assert template["job_configuration"][key] == stock["job_configuration"][key]
    assert _container(template["job_configuration"])["args"] == "{{ command }}"


def test_the_job_template_renders_gpus_node_selection_tolerations_and_image():
    from prefect.utilities.templating import apply_values

    template = _template()
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}]
    overrides = {
        "gpu_count": 4,
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": tolerations,
        "image": "registry.example/dalle:1",
    }
    flow_run = {"command": "prefect flow-run execute", "name": "train-transformer-abc", "env": {"A": "1"}}
    rendered = apply_values(template["job_configuration"], {**_defaults(template), **overrides, **flow_run})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = _container(rendered)
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (4, "4")
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == tolerations
    assert container["image"] == "registry.example/dalle:1"
    assert container["args"] == rendered["command"] == "prefect flow-run execute"
    assert "command" not in container, "the image's own command must not be replaced by the template"
    assert container["envFrom"] == [{"secretRef": {"name": "dalle-s3", "optional": True}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert "{{" not in json.dumps(rendered), "a placeholder was left unfilled"

    by_default = apply_values(template["job_configuration"], {**_defaults(template), **flow_run})
    default_pod = by_default["job_manifest"]["spec"]["template"]["spec"]
    assert _container(by_default)["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert default_pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert _container(by_default)["image"] == compose()["services"]["worker"]["image"]


def test_deployment_job_variables_are_checked_against_the_template():
    """What the server checks when a deployment's work_pool.job_variables reach it (prefect deploy)."""
    from prefect.server.schemas.actions import DeploymentCreate

    template = _template()
    good = {"gpu_count": 8, "node_selector": {"pool": "a100"}, "tolerations": [], "shm_size": "64Gi"}
    DeploymentCreate(name="train", flow_id=uuid.uuid4(), job_variables=good).check_valid_configuration(
        template
    )
    for bad in ({"gpu_count": "four"}, {"node_selector": ["a100"]}, {"tolerations": {"key": "x"}}):
        deployment = DeploymentCreate(name="train", flow_id=uuid.uuid4(), job_variables=bad)
        with pytest.raises(Exception, match="is not of type"):
            deployment.check_valid_configuration(template)
