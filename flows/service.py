"""Running the pipeline as a service: the work pools its deployments need, and the deployments of
infra/prefect.yaml served from one process (`dalle serve`) for a single machine without workers.

infra/prefect.yaml is the one description of the deployments: `prefect deploy --all --prefect-file
infra/prefect.yaml` registers them for workers, and `dalle serve` reads the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dalle.errors import UserError

REPOSITORY = Path(__file__).resolve().parent.parent
PREFECT_FILE = "infra/prefect.yaml"
GPU_KUBERNETES_TEMPLATE = "infra/work-pools/gpu-kubernetes.json"
CPU_POOL, GPU_POOL = "local-process", "gpu"


class ServiceError(UserError, RuntimeError):
    """The service cannot be set up as asked; the message says what to do."""


def find_file(rel: str, given: str | None = None) -> Path:
    """`given`, or `rel` under the current folder, or under the repository (the image's /opt/dalle)."""
    for candidate in [Path(given)] if given else [Path.cwd() / rel, REPOSITORY / rel]:
        if candidate.is_file():
            return candidate
    raise ServiceError(f"{given or rel} not found; run from the repository root or pass its path")


def create_pools(gpu_kubernetes: bool = False, template: str | None = None) -> dict[str, str]:
    """Create the work pools the deployments name; returns {pool: 'created' | 'exists'}. The gpu pool is
    a process pool (served by a GPU worker), or a Kubernetes pool with the job template that exposes
    GPU count, node selector, tolerations and image as job variables."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    pools = [WorkPoolCreate(name=CPU_POOL, type="process")]
    if gpu_kubernetes:
        path = find_file(GPU_KUBERNETES_TEMPLATE, template)
        try:
            base = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ServiceError(
                f"{path} is not a JSON job template ({err}); pass a work pool's base job template"
            ) from None
        if not isinstance(base, dict) or "job_configuration" not in base:
            raise ServiceError(
                f"{path} is not a base job template: it needs job_configuration and variables, as "
                f"{GPU_KUBERNETES_TEMPLATE} has"
            )
        pools.append(WorkPoolCreate(name=GPU_POOL, type="kubernetes", base_job_template=base))
    else:
        pools.append(WorkPoolCreate(name=GPU_POOL, type="process"))
    result = {}
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(pool)
                result[pool.name] = "created"
            except ObjectAlreadyExists:
                existing = client.read_work_pool(pool.name)
                if existing.type != pool.type:
                    raise ServiceError(
                        f"work pool {pool.name!r} exists with type {existing.type!r}, not {pool.type!r}; "
                        f"delete it (prefect work-pool delete {pool.name}) or keep its type"
                    ) from None
                result[pool.name] = "exists"
    return result


def deployment_specs(prefect_file: str | None = None) -> list[dict[str, Any]]:
    """The deployments of infra/prefect.yaml, as written there; a file without a list of named
    deployments with entrypoints is refused."""
    path = find_file(PREFECT_FILE, prefect_file)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ServiceError(f"{path} is not valid YAML ({problem}{where})") from None
    specs = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(specs, list) or not specs:
        raise ServiceError(f"{path} has no list of deployments; it should read like {PREFECT_FILE}")
    for number, spec in enumerate(specs, start=1):
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]):
            raise ServiceError(f"deployment {number} of {path} has no name")
        if not isinstance(spec.get("entrypoint"), str) or ":" not in spec["entrypoint"]:
            raise ServiceError(
                f"deployment {spec['name']!r} of {path} needs an entrypoint like flows/train.py:train_dvae_flow"
            )
    return specs


def runner_deployments(
    specs: list[dict[str, Any]],
    root: str | None = None,
    config: str | None = None,
    names: list[str] | None = None,
) -> list:
    """Prefect runner deployments of `specs` (those in `names`, all when None), with the run root and
    config file replaced where given; schedules, triggers and concurrency limits as in the file."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval

    unknown = sorted(set(names or []) - {spec["name"] for spec in specs})
    if unknown:
        raise ServiceError(f"no deployment named {unknown}; choose from {[s['name'] for s in specs]}")
    deployments = []
    for spec in specs:
        if names and spec["name"] not in names:
            continue
        path, _, function = spec["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{REPOSITORY / path}:{function}")
        parameters = dict(spec.get("parameters") or {})
        takes = set(flow.parameters.properties)
        for key, value in (("root", root), ("config", config)):
            if value is not None and key in takes:
                parameters[key] = value
        schedules = []
        for schedule in spec.get("schedules") or []:
            options = {"timezone": schedule.get("timezone"), "active": schedule.get("active", True)}
            if "cron" in schedule:
                schedules.append(Cron(schedule["cron"], **options))
            else:
                schedules.append(Interval(schedule["interval"], **options))
        limit = spec.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = ConcurrencyLimitConfig(
                limit=limit["limit"],
                collision_strategy=ConcurrencyLimitStrategy(limit.get("collision_strategy", "ENQUEUE")),
            )
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                parameters=parameters,
                schedules=schedules or None,
                triggers=[DeploymentEventTrigger.model_validate(t) for t in spec.get("triggers") or []],
                concurrency_limit=limit,
            )
        )
    return deployments


def serve(
    root: str | None = None,
    config: str | None = None,
    names: list[str] | None = None,
    prefect_file: str | None = None,
    limit: int | None = None,
    replace: bool = False,
) -> None:
    """Serve the deployments from this process until it is stopped (Ctrl-C): their schedules and event
    triggers start runs here, as a worker would. Deployments of the same names that `prefect deploy`
    registered for work pools are refused, or deleted first with `replace`."""
    from prefect import get_client
    from prefect import serve as prefect_serve
    from prefect.exceptions import ObjectNotFound

    if limit is not None and limit < 1:
        raise ServiceError(f"limit must be at least 1 flow run at a time, got {limit}")
    deployments = runner_deployments(deployment_specs(prefect_file), root, config, names)
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            full_name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name is None:
                continue  # served before: serving again takes it over
            if not replace:
                raise ServiceError(
                    f"deployment {full_name} is registered for work pool {existing.work_pool_name!r} on "
                    "this server (prefect deploy); run its workers instead, or serve with --replace to "
                    "delete the pool deployments of the same names first"
                )
            client.delete_deployment(existing.id)
    prefect_serve(*deployments, limit=limit)
