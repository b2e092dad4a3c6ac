"""The install is sound: img2dataset's `dataclasses` backport is gone, Prefect's
ephemeral API server starts and runs a flow (it dies at start-up when the backport
shadows the standard library), and every package is at the version constraints.txt pins."""

import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
# Pinned by the lock (img2dataset requires it) but uninstalled by `make install` and the Dockerfile.
REMOVED_AFTER_INSTALL = frozenset({"dataclasses"})

FLOW = """
from prefect import flow, task

@task
def double(x):
    return 2 * x

@flow
def smoke(x: int) -> int:
    return double(x) + 1

print("RESULT", smoke(20))
"""


def test_dataclasses_is_the_standard_library():
    origin = importlib.util.find_spec("dataclasses").origin
    assert os.path.dirname(origin) == sysconfig.get_paths()["stdlib"], (
        f"dataclasses comes from {origin}: the backport shadows the standard library; "
        "run `pip uninstall -y dataclasses` (the Makefile does)"
    )


def test_flow_runs_on_ephemeral_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    done = subprocess.run(
        [sys.executable, "-c", FLOW],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert "RESULT 41" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "unexpected keyword argument 'slots'" not in done.stderr


def installed_versions() -> dict[str, str]:
    """{name: version} of the distributions installed in this environment's site-packages.

    Only site-packages is read, and the first distribution of a name wins, as at import: once
    setuptools is imported (torch.compile and Ray import it), its `_vendor` folder is on sys.path
    with its own older copies of packaging, zipp and others, which are not installed packages.
    """
    folders = list(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    versions: dict[str, str] = {}
    for dist in metadata.distributions(path=folders):
        versions.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return versions


def lock_drift(
    constraints_text: str, installed: dict[str, str], environment: dict | None = None
) -> list[str]:
    """How `installed` ({name: version}) differs from a constraints file, one message per pin.

    A pin whose environment marker excludes this interpreter (the running one, with the marker
    values in `environment` put over its own) is skipped; every other one must be installed at
    exactly its version, except the packages the install removes, which must be absent.
    """
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    problems = []
    for raw in constraints_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pin = Requirement(line)
        if pin.marker is not None and not pin.marker.evaluate(environment):
            continue
        name = canonicalize_name(pin.name)
        if [spec.operator for spec in pin.specifier] != ["=="]:
            problems.append(f"{line}: not an exact pin")
            continue
        version = installed.get(name)
        if name in REMOVED_AFTER_INSTALL:
            if version is not None:
                problems.append(f"{name} {version} is installed; the install removes it")
        elif version is None:
            problems.append(f"{name} is not installed; the lock pins {pin.specifier}")
        elif not pin.specifier.contains(version, prereleases=True):
            problems.append(f"{name} {version} is installed; the lock pins {pin.specifier}")
    return problems


def test_installed_packages_match_the_lock():
    # setuptools puts its `_vendor` folder on sys.path when imported, as it is when another test of
    # this worker ran first: the check must read the installed packages all the same.
    import setuptools  # noqa: F401

    problems = lock_drift(CONSTRAINTS.read_text(), installed_versions())
    assert not problems, (
        "the environment has drifted from constraints.txt (run `make install`; after a change of "
        "pyproject.toml's dependencies, `make lock` first):\n" + "\n".join(problems)
    )


def test_lock_drift_reports_each_difference():
    lock = """\
# a header
Foo_Bar==1.0
    # via dalle-pipeline (pyproject.toml)
old-only==2.0 ; python_full_version < '3.0'
new-only==3.0 ; python_full_version >= '3.0'
same==4.0.post1
missing==5.0
dataclasses==0.6
loose>=1.0
"""
    installed = {"foo-bar": "1.1", "new-only": "3.0", "same": "4.0.post1", "dataclasses": "0.6", "loose": "1"}
    assert lock_drift(lock, installed) == [
        "foo-bar 1.1 is installed; the lock pins ==1.0",
        "missing is not installed; the lock pins ==5.0",
        "dataclasses 0.6 is installed; the install removes it",
        "loose>=1.0: not an exact pin",
    ]
    # The markers are read for the interpreter given: on Python 2, old-only applies instead.
    python2 = {"python_full_version": "2.7.18", "python_version": "2.7"}
    assert "old-only is not installed; the lock pins ==2.0" in lock_drift(lock, installed, python2)
    fixed = {**installed, "foo-bar": "1.0", "missing": "5.0"}
    del fixed["dataclasses"]
    assert lock_drift(lock.replace("loose>=1.0", "loose==1.0"), fixed) == []


def test_img2dataset_is_pinned_exactly_everywhere():
    # dalle/curate/netguard.py patches img2dataset's downloader: no release may come in unreviewed.
    pins = [
        Requirement(line) for line in CONSTRAINTS.read_text().splitlines() if line.startswith("img2dataset")
    ]
    assert len(pins) == 1 and pins[0].marker is None, pins
    assert [spec.operator for spec in pins[0].specifier] == ["=="], pins
    # ... and so is the package's own requirement, for installs without the lock.
    pyproject = (CONSTRAINTS.parent / "pyproject.toml").read_text()
    declared = [
        Requirement(d) for d in re.findall(r'^\s*"(img2dataset[^"]*)",', pyproject, flags=re.MULTILINE)
    ]
    assert [str(r.specifier) for r in declared] == [str(pins[0].specifier)], declared
