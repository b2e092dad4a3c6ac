"""The engine that runs img2dataset's shards (`crawl.distributor`): its own worker processes, Ray or Spark.

img2dataset's `ray` and `pyspark` distributors expect the caller to have started the engine (its `ray`
distributor submits tasks to whatever Ray is initialised; its `pyspark` one takes the active Spark
session). `running_engine` does that in the crawl's child process, around `img2dataset.download`, and
stops it after. Both ship img2dataset's downloader object to their workers by pickling it (Ray as a task
argument, Spark inside the task's closure), so `GuardedDownloader.__call__` installs the network guard in
whichever worker runs a shard, as in the multiprocessing workers.

`check_engine` runs in the calling process before the child is started, so that a missing package (or,
for Spark, a missing Java) is one clear error rather than a traceback from the child.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

from dalle.config import CrawlConfig
from dalle.errors import UserError

# distributor -> (module it imports, extra of this project that installs it)
ENGINE_PACKAGES = {"ray": ("ray", "ray"), "pyspark": ("pyspark", "spark")}
# A local Ray's shared-memory object store: the crawl passes only shard descriptors and statuses through
# it (the images go from the workers straight to the output folder), so a small one does.
LOCAL_RAY_OBJECT_STORE_BYTES = 256 * 2**20
MIN_JAVA = 17  # pyspark 4 runs on Java 17 or newer


class EngineError(UserError, RuntimeError):
    """The crawl's engine cannot be used; the message says what to install or set."""


def install_hint(distributor: str) -> str:
    module, extra = ENGINE_PACKAGES[distributor]
    return (
        f"crawl.distributor {distributor!r} needs the {module} package: install this project with the "
        f"{extra!r} extra (pip install -c constraints.txt -e '.[{extra}]', or pip install "
        f"'dalle-pipeline[{extra}]'), or set crawl.distributor: multiprocessing"
    )


def java_major_version() -> int | None:
    """The major version of the `java` that Spark would start ($JAVA_HOME/bin/java, else PATH), or None."""
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        return None
    try:
        done = subprocess.run(  # noqa: PLW1510 - the output is parsed, a failure reads as no Java
            [java, "-version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def check_engine(cfg: CrawlConfig) -> None:
    """Refuse, before anything starts, a distributor whose package (or Java, for Spark) is missing."""
    if cfg.distributor == "multiprocessing":
        return
    module, _ = ENGINE_PACKAGES[cfg.distributor]
    if importlib.util.find_spec(module) is None:
        raise EngineError(install_hint(cfg.distributor))
    if cfg.distributor == "pyspark":
        major = java_major_version()
        if major is None or major < MIN_JAVA:
            found = "no java found" if major is None else f"found Java {major}"
            raise EngineError(
                f"crawl.distributor 'pyspark' needs Java {MIN_JAVA} or newer ({found}; set JAVA_HOME or put "
                "java on PATH; on Debian or Ubuntu: apt-get install -y default-jre-headless)"
            )


def engine_spec(cfg: CrawlConfig) -> dict:
    """What the crawl's child process needs to start the engine (plain values, for its JSON spec)."""
    return {
        "distributor": cfg.distributor,
        "processes": cfg.processes,
        "ray_address": cfg.ray_address,
        "spark_master": cfg.spark_master,
    }


def _engine_module(distributor: str):
    module, _ = ENGINE_PACKAGES[distributor]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise EngineError(install_hint(distributor)) from None


def _workers_import_this_dalle() -> None:
    """Put the folder this `dalle` package comes from first on the PYTHONPATH that the engine's local
    workers inherit, so that they unpickle the downloader with this code, not another installed copy."""
    import dalle

    root = os.path.dirname(os.path.dirname(os.path.abspath(dalle.__file__)))
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


@contextlib.contextmanager
def _ray(spec: dict) -> Iterator[None]:
    # Ray reads its settings from the environment when it is imported; dalle.curate.fetch sets them
    # before img2dataset (which imports Ray) is loaded.
    import dalle.curate.fetch  # noqa: F401

    ray = _engine_module("ray")
    import img2dataset.distributor

    if not hasattr(img2dataset.distributor, "ray_download"):  # its ray distributor would do nothing
        raise EngineError(f"img2dataset could not import ray when it was loaded; {install_hint('ray')}")
    if spec["ray_address"]:
        ray.init(address=spec["ray_address"])
    else:
        # "local": always a new Ray of our own, never one that happens to run on this machine.
        ray.init(
            address="local",
            num_cpus=spec["processes"],
            include_dashboard=False,
            object_store_memory=LOCAL_RAY_OBJECT_STORE_BYTES,
        )
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _spark(spec: dict) -> Iterator[None]:
    _engine_module("pyspark")
    from pyspark.sql import SparkSession

    master = spec["spark_master"] or f"local[{spec['processes']}]"
    builder = SparkSession.builder.master(master).appName("dalle-crawl").config("spark.ui.enabled", "false")
    if master.startswith("local"):
        # The Python workers run this interpreter (pyspark's default is whatever python3 is on PATH),
        # and the driver listens on loopback only, without looking up this machine's name.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1").config(
            "spark.driver.bindAddress", "127.0.0.1"
        )
    spark = builder.getOrCreate()
    try:
        yield
    finally:
        spark.stop()


@contextlib.contextmanager
def running_engine(spec: dict) -> Iterator[None]:
    """Within the block, the engine of `spec["distributor"]` runs (nothing to start for multiprocessing)."""
    distributor = spec["distributor"]
    if distributor == "multiprocessing":
        yield
        return
    _workers_import_this_dalle()
    with _ray(spec) if distributor == "ray" else _spark(spec):
        yield
