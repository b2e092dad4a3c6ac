"""Extra copies of the training metrics for the dashboards a team already uses: TensorBoard, MLflow and
Weights & Biases (the config's `dashboards` section).

reports/metrics/ (the loop's MetricsLog) stays the source of truth; a sink only copies each logged
record, every number in it as the scalar `<model>/<key>` at the record's step. A sink the config asks for
whose package is missing (or W&B online without WANDB_API_KEY) is a ConfigError when the sinks are opened,
before any training step. A sink that fails later (its server unreachable, its upload refused) logs one
warning and is off for the rest of the run: training never stops for a dashboard.

TensorBoard writes its event file in a local temporary folder and copies it into the run root at
reports/tensorboard/<model>/ (through Storage, so local and s3:// roots alike) at most every
UPLOAD_EVERY_S seconds and at close; a resumed run adds a new event file next to the old ones. For a
local root, `tensorboard --logdir <root>/reports/tensorboard` shows them directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from numbers import Real
from typing import Any, Protocol

from dalle.config import ConfigError, DashboardsConfig
from dalle.runroot import REPORTS_DIR
from dalle.storage import Storage

TENSORBOARD_DIR = f"{REPORTS_DIR}/tensorboard"
UPLOAD_EVERY_S = 10.0
DASHBOARDS_EXTRA = "pip install 'dalle-pipeline[dashboards]'"

# Not scalars of their own: the step is the x axis, the time the event's wall time.
_NOT_SCALARS = ("step", "time")


class SinkUnavailable(ConfigError):
    """A dashboard the configuration asks for cannot be used here (its package is missing, or its
    credentials are not in the environment); the message says what to install or set."""


class _Sink(Protocol):
    name: str

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None: ...

    def close(self) -> None:
        """Flush everything and let go (upload, finish the remote run)."""
        ...

    def discard(self) -> None:
        """Let go after a failure, quickly and without raising; may leave things behind."""
        ...


def tensorboard_dir(model: str) -> str:
    """Folder of a model's TensorBoard event files, relative to the run root."""
    return f"{TENSORBOARD_DIR}/{model}"


def default_run_name(storage: Storage, model: str) -> str:
    """Name of a run on a dashboard: the run root's last path component and the model (`demo-dvae`)."""
    return f"{storage.root.rstrip('/').rsplit('/', 1)[-1]}-{model}"


def scalars_of(record: dict[str, Any], model: str) -> dict[str, float]:
    """Every number of a metrics record but its step and time, as `<model>/<key>`."""
    return {
        f"{model}/{key}": float(value)
        for key, value in record.items()
        if key not in _NOT_SCALARS and isinstance(value, Real) and not isinstance(value, bool)
    }


class MetricSinks:
    """The open sinks of one model's training; `write` each logged record, `close` at the end."""

    def __init__(self, model: str, sinks: list[_Sink], log: Callable[[str], None] = print):
        self.model, self.sinks, self.log = model, list(sinks), log

    @property
    def names(self) -> list[str]:
        return [sink.name for sink in self.sinks]

    def write(self, record: dict[str, Any]) -> None:
        if not self.sinks:
            return
        step, walltime = int(record["step"]), record.get("time")
        scalars = scalars_of(record, self.model)
        for sink in list(self.sinks):
            try:
                sink.write(step, scalars, walltime)
            except Exception as err:  # noqa: BLE001 - a dashboard never stops training
                self._disable(sink, err)

    def close(self) -> None:
        """Close every sink; never raises (it runs on the way out of a failed training too)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001
                self.log(
                    f"warning: {self.model}: closing the {sink.name} metrics sink failed "
                    f"({type(err).__name__}: {err}); reports/metrics/ has every metric"
                )
                _quietly(sink.discard)

    def _disable(self, sink: _Sink, err: Exception) -> None:
        self.sinks.remove(sink)
        self.log(
            f"warning: {self.model}: the {sink.name} metrics sink failed ({type(err).__name__}: {err}); "
            "it is off for the rest of this run, training goes on and reports/metrics/ has every metric"
        )
        _quietly(sink.discard)


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001, S110 - only called after a failure already reported
        pass


def check_available(cfg: DashboardsConfig) -> None:
    """Raise SinkUnavailable when a configured dashboard cannot be used here (no I/O, no network)."""
    _requirements(cfg)


def _requirements(cfg: DashboardsConfig) -> dict[str, Any]:
    """The modules of the configured sinks, imported; SinkUnavailable names what is missing."""
    modules: dict[str, Any] = {}
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise SinkUnavailable(
                f"dashboards.tensorboard needs the tensorboard package ({err}); install it with "
                f"{DASHBOARDS_EXTRA}, or set dashboards.tensorboard: false"
            ) from None
        modules["tensorboard"] = SummaryWriter
    if cfg.mlflow_tracking_uri is not None:
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise SinkUnavailable(
                f"dashboards.mlflow_tracking_uri needs the mlflow package ({err}); install it with "
                "`pip install mlflow`, or remove dashboards.mlflow_tracking_uri"
            ) from None
        modules["mlflow"] = (MlflowClient, Metric)
    if cfg.wandb_project is not None:
        try:
            import wandb
        except ImportError as err:
            raise SinkUnavailable(
                f"dashboards.wandb_project needs the wandb package ({err}); install it with "
                "`pip install wandb`, or remove dashboards.wandb_project"
            ) from None
        if cfg.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise SinkUnavailable(
                "dashboards.wandb_project is set with wandb_mode online, but WANDB_API_KEY is not in the "
                "environment; export it (never put it in the config), or set dashboards.wandb_mode: offline"
            )
        modules["wandb"] = wandb
    return modules


def open_sinks(
    storage: Storage,
    cfg: DashboardsConfig,
    model: str,
    run_name: str,
    log: Callable[[str], None] = print,
) -> MetricSinks:
    """Open the sinks `cfg` asks for. A missing package raises SinkUnavailable before anything is
    opened; a sink that cannot be reached is left out with a warning."""
    modules = _requirements(cfg)
    openers: list[tuple[str, Callable[[], _Sink]]] = []
    if "tensorboard" in modules:
        openers.append(("TensorBoard", lambda: _TensorBoard(modules["tensorboard"], storage, model)))
    if "mlflow" in modules:
        openers.append(("MLflow", lambda: _MLflow(modules["mlflow"], cfg, run_name)))
    if "wandb" in modules:
        openers.append(("W&B", lambda: _WandB(modules["wandb"], cfg, run_name, log)))
    sinks: list[_Sink] = []
    for name, opener in openers:
        try:
            sinks.append(opener())
        except Exception as err:  # noqa: BLE001 - a dashboard never stops training
            log(
                f"warning: {model}: the {name} metrics sink could not be opened "
                f"({type(err).__name__}: {err}); "
                "training goes on without it, reports/metrics/ has every metric"
            )
    if sinks:
        log(f"{model}: metrics also go to {', '.join(sink.name for sink in sinks)}")
    return MetricSinks(model, sinks, log)


class _TensorBoard:
    """Event files written locally, copied into the run root's reports/tensorboard/<model>/."""

    name = "TensorBoard"

    def __init__(self, summary_writer: Any, storage: Storage, model: str):
        self.storage, self.rel_dir = storage, tensorboard_dir(model)
        self.local = tempfile.mkdtemp(prefix="dalle-tensorboard-")
        # Flushed by us before each upload; the writer's own timer would only flush a file not yet copied.
        self.writer = summary_writer(log_dir=self.local, max_queue=1000, flush_secs=3600)
        self.uploaded: dict[str, int] = {}  # file name -> size at its last upload
        self.last_upload = time.monotonic()

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)
        if time.monotonic() - self.last_upload >= UPLOAD_EVERY_S:
            self.upload()

    def upload(self) -> None:
        self.writer.flush()
        for name in sorted(os.listdir(self.local)):
            path = os.path.join(self.local, name)
            if not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if self.uploaded.get(name) != size:
                with open(path, "rb") as handle:
                    self.storage.write_bytes(f"{self.rel_dir}/{name}", handle.read())
                self.uploaded[name] = size
        self.last_upload = time.monotonic()

    def close(self) -> None:
        self.writer.close()
        self.upload()
        shutil.rmtree(self.local, ignore_errors=True)

    def discard(self) -> None:
        # The local event file stays where it is, for a copy by hand.
        self.writer.close()


class _MLflow:
    """A run in an MLflow experiment, through the client API (no process-global active run)."""

    name = "MLflow"

    def __init__(self, modules: tuple, cfg: DashboardsConfig, run_name: str):
        client_class, self.metric_class = modules
        self.client = client_class(tracking_uri=cfg.mlflow_tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(cfg.mlflow_experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        timestamp = int((walltime if walltime is not None else time.time()) * 1000)
        metrics = [self.metric_class(key, value, timestamp, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")

    def discard(self) -> None:
        pass  # the server is not answering: the run stays RUNNING there


class _WandB:
    """A W&B run; its local files go to WANDB_DIR, or to a temporary folder removed after an online run."""

    name = "W&B"

    def __init__(self, wandb: Any, cfg: DashboardsConfig, run_name: str, log: Callable[[str], None]):
        self.log, self.mode = log, cfg.wandb_mode
        # An offline run is kept (for `wandb sync`): in WANDB_DIR, else in a temporary folder left in place.
        given = os.environ.get("WANDB_DIR")
        folder = given or tempfile.mkdtemp(prefix="dalle-wandb-")
        self.temporary = folder if not given and cfg.wandb_mode == "online" else None
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=run_name,
            mode=cfg.wandb_mode,
            dir=folder,
            reinit="create_new",  # a run of its own, whatever other run this process has open
            settings=wandb.Settings(console="off"),  # metrics only: leave stdout and stderr alone
        )

    def write(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        sync_dir = getattr(self.run.settings, "sync_dir", None)
        self.run.finish()
        if self.mode == "offline" and sync_dir:
            self.log(f"W&B offline run written to {sync_dir}; upload it with `wandb sync {sync_dir}`")
        if self.temporary:
            shutil.rmtree(self.temporary, ignore_errors=True)

    def discard(self) -> None:
        self.run.finish(exit_code=1)
