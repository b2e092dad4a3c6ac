"""infra/prefect.yaml is deployable: every entrypoint loads, its parameters are the flow's,
and the gallery's event trigger turns a real checkpoint event into that checkpoint's gallery run."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_each_deployment_loads_with_parameters_its_flow_takes(deployment):
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    accepted = inspect.signature(flow.fn).parameters
    for trigger in deployment.get("triggers", []):
        DeploymentEventTrigger.model_validate(trigger)
    for source in [deployment.get("parameters", {})] + [
        t.get("parameters", {}) for t in deployment.get("triggers", [])
    ]:
        unknown = set(source) - set(accepted)
        assert not unknown, f"{deployment['name']}: {flow.name} takes no parameter {sorted(unknown)}"
    required = {name for name, p in accepted.items() if p.default is inspect.Parameter.empty}
    given = set(deployment.get("parameters", {})) | {
        k for t in deployment.get("triggers", []) for k in t["parameters"]
    }
    assert required <= given, f"{deployment['name']} leaves {sorted(required - given)} unset"


def test_no_flow_module_shadows_the_standard_library():
    """Prefect puts an entrypoint's folder first on sys.path (and leaves it there): a flows/tokenize.py
    would stand in for the standard `tokenize` in every process spawned later, which dies at start-up
    (img2dataset's worker pool respawned them forever)."""
    import sys

    names = {path.stem for path in (REPO / "flows").glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


def test_training_leaves_galleries_to_the_event_triggered_deployment():
    by_name = {d["name"]: d for d in DEPLOYMENTS}
    assert by_name["train-transformer"]["parameters"]["galleries"] is False
    (trigger,) = by_name["gallery"]["triggers"]
    assert trigger["expect"] == ["dalle.checkpoint.saved"] and trigger["match"] == {
        "dalle.model": "transformer"
    }


def test_the_gallery_trigger_renders_a_checkpoint_event_into_its_run(tmp_path, prefect_server):
    """Prefect's own template renderer, on the event the training flow emits, read back from the API."""
    from prefect import flow, get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.utilities.user_templates import (
        register_user_template_filters,
        render_user_template_sync,
    )

    from dalle.runroot import checkpoint_dir
    from dalle.storage import Storage
    from flows.common import CHECKPOINT_EVENT, announce_checkpoint

    storage = Storage(str(tmp_path / "run"))
    uri = storage.uri(checkpoint_dir("transformer", 1200))

    @flow
    def saved() -> None:
        announce_checkpoint({"model": "transformer", "step": 1200, "uri": uri, "metrics": {"loss": 1.5}})

    saved()
    wanted = EventFilter(
        event=EventNameFilter(name=[CHECKPOINT_EVENT]), resource=EventResourceFilter(id=[uri])
    )
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(wanted, limit=5).events
        if events or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert events, "the checkpoint event never reached the API"

    (trigger,) = {d["name"]: d for d in DEPLOYMENTS}["gallery"]["triggers"]
    register_user_template_filters(all_filters)
    rendered = {
        k: render_user_template_sync(v, {"event": events[0]}) for k, v in trigger["parameters"].items()
    }
    assert rendered == {"root": storage.uri(), "checkpoint": uri}
    assert events[0].resource["dalle.model"] == trigger["match"]["dalle.model"]
