"""Write constraints.txt: the lock of the whole dependency set, for `pip install -c constraints.txt`.

Run by `make lock` (which brings uv into a throwaway virtual environment); by hand:

    python tools/lock.py --uv /path/to/uv --torch-spec "torch==2.14.1 torchvision==0.29.1" \
        --check-torch-spec "torch==2.9.1 torchvision==0.24.1" --output constraints.txt

1. uv resolves pyproject.toml with its `dev` extra once for every platform and Python >= 3.10
   (`--universal`; pins that differ by Python version carry environment markers), with torch held
   at --torch-spec, the Makefile's default TORCH_SPEC.
2. torch, torchvision and every package that only they pull in (nvidia-*, cuda-*, triton,
   setuptools, ...) are left out: the Makefile installs torch first from TORCH_SPEC, and torch pins
   its CUDA stack itself, differently for each release and platform. A package that something else
   needs too (filelock, sympy, networkx, numpy, ...) stays pinned.
3. The result must resolve, from wheels alone, with each torch spec on x86-64 and arm64 Linux for
   every Python in CHECK_PYTHONS, and each pin must allow that Python by its Requires-Python (uv
   ignores upper bounds there, pip does not); constraints.txt is written only when it does.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Pins the resolution must respect beyond pyproject.toml, with the reason each is needed.
LOCK_INPUTS = {
    # uv ignores upper bounds on Requires-Python and would pick dataclasses 0.8, which declares
    # `>=3.6, <3.7`, so pip refuses it on 3.10+. 0.6 is what pip installs for img2dataset's
    # `dataclasses>=0.6`; `make install` removes it again afterwards (see the Makefile).
    "dataclasses": "dataclasses==0.6",
}

# A comment written above a package's pin in constraints.txt.
NOTES = {
    "img2dataset": (
        "Pinned exactly on purpose: dalle/curate/netguard.py patches img2dataset's downloader, so a new\n"
        "release must never come in silently. pyproject.toml pins it; raise it there, after reviewing\n"
        "the release and running tests/test_netguard.py."
    ),
    "dataclasses": (
        "img2dataset requires this backport; `make install` and the Dockerfile uninstall it right after\n"
        "installing, because it shadows the standard library and kills Prefect's API server."
    ),
}

# Packages published only as a source distribution, which the wheels-only check must let build; each
# pure Python (no compiler involved), with the reason it is in the dependency set. None today: pyspark
# (the crawl's Spark engine) is one, and is left out of the `dev` extra that the lock resolves.
SOURCE_ONLY: dict[str, str] = {}


def _source_only_clause() -> str:
    return f" ({', '.join(sorted(SOURCE_ONLY))} from source: no wheel is published)" if SOURCE_ONLY else ""


CHECK_PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
CHECK_PLATFORMS = ("x86_64-manylinux_2_28", "aarch64-manylinux_2_28")
INDEX = "https://pypi.org/simple"
ROOT_MARK = "dalle-pipeline (pyproject.toml)"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_blocks(text: str) -> list[tuple[str, list[str], set[str]]]:
    """uv's output as (package name, its lines, the packages it is required by), one per pin line."""
    blocks: list[tuple[str, list[str], set[str]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace() and not line.startswith("#"):
            name = canonical(re.split(r"[\s=<>!~;\[]", line, maxsplit=1)[0])
            blocks.append((name, [line], set()))
            continue
        if not blocks:
            continue  # a header line
        blocks[-1][1].append(line)
        via = line.strip().lstrip("#").strip()
        if via == "via" or via.startswith("via "):
            via = via[3:].strip()
        if via and not via.startswith(("-c ", "-r ")):
            blocks[-1][2].add(via if via == ROOT_MARK else canonical(via))
    return blocks


def torch_only(blocks: list[tuple[str, list[str], set[str]]], seeds: set[str]) -> set[str]:
    """`seeds` plus every package that is required only by packages in the result."""
    parents: dict[str, set[str]] = {}
    for name, _, via in blocks:
        parents.setdefault(name, set()).update(via)
    left_out = set(seeds)
    changed = True
    while changed:
        changed = False
        for name, via in parents.items():
            if name not in left_out and via and via <= left_out:
                left_out.add(name)
                changed = True
    return left_out


def read_pins(text: str) -> dict[str, str]:
    """`name==version` lines (a resolution for one platform, without markers) as {name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.split(";", 1)[0].strip()
    return pins


def files_of(name: str) -> list[dict]:
    """The files PyPI's JSON simple API lists for a project."""
    request = urllib.request.Request(
        f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["files"]


def file_version(filename: str) -> str | None:
    """The version in a wheel's or a source distribution's file name; None for other files."""
    if filename.endswith(".whl"):
        return filename.split("-")[1]
    stem = re.sub(r"\.(tar\.gz|zip|tar\.bz2|tgz)$", "", filename)
    return stem.rsplit("-", 1)[-1] if stem != filename else None


def requires_python_problems(wanted: dict[tuple[str, str], set[str]]) -> list[str]:
    """Pins (name, version) -> Pythons they are installed on: those whose files all refuse one of them."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    def is_version(filename: str, version: str) -> bool:
        try:
            return Version(file_version(filename) or "") == Version(version)
        except InvalidVersion:
            return False

    names = sorted({name for name, _ in wanted})
    with ThreadPoolExecutor(max_workers=8) as pool:
        listings = dict(zip(names, pool.map(files_of, names)))
    problems = []
    for (name, version), pythons in sorted(wanted.items()):
        files = [f for f in listings[name] if is_version(f["filename"], version)]
        if not files:
            problems.append(f"{name}=={version}: no files on {INDEX}")
            continue
        for python in sorted(pythons, key=Version):
            if not any(
                SpecifierSet(f.get("requires-python") or "").contains(python, prereleases=True) for f in files
            ):
                declared = sorted({f.get("requires-python") or "" for f in files})
                problems.append(f"{name}=={version} on Python {python}: Requires-Python {declared}")
    return problems


def header(uv_version: str, command: list[str], torch_spec: str, check_spec: str, left_out: set[str]) -> str:
    shown = sorted(left_out)
    lines = [
        "# The lock of dalle-pipeline's whole dependency set (pyproject.toml with its `dev` extra), one",
        "# resolution for x86-64 and arm64 Linux with Python 3.10 or newer: pins that differ by Python",
        "# version carry environment markers, which pip evaluates. Used as pip constraints by",
        "# `make install` and the Dockerfile (`pip install -c constraints.txt ...`), and so by CI.",
        "#",
        f"# Made by `make lock` (tools/lock.py) with {uv_version}; do not edit by hand. Refresh it with",
        "# `make lock` after changing the dependencies in pyproject.toml, or to take newer releases,",
        "# then run `make install test` and commit this file. The resolution:",
        *(f"#   {part}" for part in command),
        f"# holding {torch_spec} (the Makefile's TORCH_SPEC). Checked: the pins also",
        f"# resolve from wheels alone{_source_only_clause()} on",
        f"# x86-64 and arm64 Linux, Python {CHECK_PYTHONS[0]} to {CHECK_PYTHONS[-1]}, with",
        f"# that TORCH_SPEC and with {check_spec} (the aarch64 one), and each pin's",
        "# Requires-Python allows every Python it is installed on.",
        "#",
        "# Left out on purpose: torch, torchvision and what only they need, because the Makefile and",
        "# the Dockerfile install torch first from TORCH_SPEC and each torch release pins its own CUDA",
        "# stack. Left out this time:",
    ]
    line = "#  "
    for name in shown:
        if len(line) + len(name) + 1 > 100:
            lines.append(line)
            line = "#  "
        line += " " + name
    lines.append(line)
    return "\n".join(lines) + "\n\n"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, text=True, capture_output=True, cwd=ROOT, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uv", default="uv", help="the uv executable")
    parser.add_argument("--torch-spec", required=True, help="the Makefile's TORCH_SPEC")
    parser.add_argument("--check-torch-spec", required=True, help="another torch spec the lock must allow")
    parser.add_argument("--output", default="constraints.txt")
    parser.add_argument(
        "--upgrade", action="store_true", help="take the newest releases (default: keep the current pins)"
    )
    args = parser.parse_args(argv)

    uv_version = " ".join(run([args.uv, "--version"]).stdout.split()[:2])  # "uv 0.13.9"
    with tempfile.TemporaryDirectory(prefix="dalle-lock-") as tmp:
        inputs = Path(tmp, "lock-inputs.txt")
        inputs.write_text("\n".join([*args.torch_spec.split(), *LOCK_INPUTS.values()]) + "\n")
        base = ["pip", "compile", "pyproject.toml", "--extra", "dev"]
        compile_args = [
            *base, "--universal", "--python-version", "3.10",
            "--no-emit-package", "torch", "--no-emit-package", "torchvision",
        ]  # fmt: skip
        # uv keeps the pins of an existing output file where they still resolve: a new dependency
        # adds its own pins and moves only what it must.
        previous = Path(tmp, "previous.txt")
        current = Path(ROOT, args.output)
        previous.write_text("" if args.upgrade or not current.exists() else current.read_text())
        done = run([
            args.uv, *compile_args, "--no-header", "--quiet", "--constraint", str(inputs),
            "--output-file", str(previous),
        ])  # fmt: skip
        if done.returncode:
            sys.stderr.write(done.stderr)
            return done.returncode
        blocks = parse_blocks(previous.read_text())
        left_out = torch_only(blocks, {"torch", "torchvision"})
        body = []
        for name, lines, _ in blocks:
            if name in left_out:
                continue
            if name in NOTES:
                body.extend("# " + note for note in NOTES[name].splitlines())
            # uv names the temporary inputs file; say where its pins come from instead.
            body.extend(
                re.sub(r"-c \S*lock-inputs\.txt", "-c lock inputs (tools/lock.py)", line) for line in lines
            )
        missing = [name for name in NOTES if not any(name == b[0] for b in blocks)]
        if missing:
            sys.stderr.write(f"tools/lock.py: no pin for {missing}; update NOTES\n")
            return 1
        command = [
            "uv " + " ".join(compile_args[:6]),
            "  " + " ".join(compile_args[6:]),
            "  --constraint <TORCH_SPEC and tools/lock.py's LOCK_INPUTS>",
        ]
        text = header(uv_version, command, args.torch_spec, args.check_torch_spec, left_out)
        text += "\n".join(body) + "\n"

        candidate = Path(tmp, "constraints.txt")
        candidate.write_text(text)
        failed = 0
        locked = {name for name, _, _ in blocks if name not in left_out}
        wanted: dict[tuple[str, str], set[str]] = {}
        # Wheels only, but for SOURCE_ONLY's packages (uv's `:all:` admits no exception).
        only_binary = [
            option
            for name in sorted(
                ({name for name, _, _ in blocks} | {"torch", "torchvision"}) - set(SOURCE_ONLY)
            )
            for option in ("--only-binary", name)
        ]
        for spec in (args.torch_spec, args.check_torch_spec):
            spec_file = Path(tmp, "torch-spec.txt")
            spec_file.write_text("\n".join(spec.split()) + "\n")
            for platform in CHECK_PLATFORMS:
                for python in CHECK_PYTHONS:
                    resolved = Path(tmp, "resolved.txt")
                    check = run([
                        args.uv, *base, "--python-version", python, "--python-platform", platform,
                        "--constraint", str(candidate), "--constraint", str(spec_file),
                        *only_binary, "--no-header", "--no-annotate", "--quiet",
                        "--output-file", str(resolved),
                    ])  # fmt: skip
                    status = "ok" if check.returncode == 0 else "FAILED"
                    print(f"lock check: {spec} on {platform}, Python {python}: {status}", flush=True)
                    if check.returncode:
                        failed += 1
                        sys.stderr.write(check.stderr)
                        continue
                    for name, version in read_pins(resolved.read_text()).items():
                        if name in locked:
                            wanted.setdefault((name, version), set()).add(python)
        problems = requires_python_problems(wanted)
        for problem in problems:
            sys.stderr.write(f"lock check: {problem}\n")
        print(f"lock check: Requires-Python of {len(wanted)} pins: {len(problems)} problems", flush=True)
        failed += len(problems)
        if failed:
            sys.stderr.write(f"tools/lock.py: {failed} checks failed; {args.output} is unchanged\n")
            return 1
        Path(ROOT, args.output).write_text(text)
    pins = sum(1 for name, _, _ in blocks if name not in left_out)
    print(f"wrote {args.output}: {pins} pins; left out {len(left_out)} torch-only packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
