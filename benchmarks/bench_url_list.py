"""Reading a URL list of 10 million rows: time and peak memory of the streamed reader and prepare_input.

Writes a TSV list of --rows rows (URL and caption, about 800 MB for 10 million), then reads it in
fresh processes and records each one's peak resident memory (VmHWM on Linux, else ru_maxrss) and
time:

- floor: the imports only;
- streamed: `iter_url_list`, batch by batch (what a streaming consumer holds);
- table: `read_url_list`, the whole list as one Arrow table (what the crawl's input step held before
  it streamed);
- whole_file (the baseline, as the reader did before it streamed): the file's bytes in memory and
  parsed at once with pyarrow's CSV reader, before any row is normalised;
- prepare_input: the crawl's input step on the list (robots.txt not checked, so nothing is fetched):
  it streams the list into raw/_input/ and holds the digests of its URLs (24 bytes a row) for
  repeats; measured against prepare_floor, the imports of the crawl module (img2dataset, torch).

    python benchmarks/bench_url_list.py                 # 10,000,000 rows
    python benchmarks/bench_url_list.py --rows 200000   # a quick run

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PEAK = """
import json, resource, sys, time
try:
    with open("/proc/self/status") as _status:
        _kib = next(int(line.split()[1]) for line in _status if line.startswith("VmHWM:"))
except OSError:
    _kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
print(json.dumps({"peak_mib": round(_kib / 1024, 1), "seconds": round(time.perf_counter() - _t0, 2)}))
"""

_READER = "from dalle.curate.urls import iter_url_list, read_url_list"
_CRAWL = "from dalle.curate.crawl import prepare_input\nfrom dalle.storage import Storage"

# Each mode: (what it imports before the clock starts, what it runs); a mode's peak is compared with
# the floor that imports the same.
MODES = {
    "floor": (_READER, ""),
    "streamed": (_READER, "rows = sum(b.num_rows for b in iter_url_list(uri, CrawlConfig()))"),
    "table": (_READER, "rows = read_url_list(uri, CrawlConfig()).num_rows"),
    "whole_file": (
        _READER,
        textwrap.dedent(
            """
            import io
            import pyarrow.csv as pacsv
            data = open(uri, "rb").read()
            rows = pacsv.read_csv(
                io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter="\\t", quote_char=False)
            ).num_rows
            """
        ),
    ),
    "prepare_floor": (_CRAWL, ""),
    "prepare_input": (
        _CRAWL,
        "rows = prepare_input(uri, Storage(uri + '.run'), CrawlConfig(respect_robots_txt=False)).to_crawl",
    ),
}
FLOORS = {"prepare_input": "prepare_floor"}  # the others': floor


def write_list(path: Path, rows: int) -> None:
    with open(path, "w") as out:
        out.write("url\tcaption\n")
        out.writelines(
            f"https://img{i % 9973}.example.com/photos/{i:010d}.jpg\ta photo of a thing, number {i}\n"
            for i in range(rows)
        )


def measure(uri: str, mode: str) -> dict:
    imports, work = MODES[mode]
    code = "\n".join(
        [
            "from dalle.config import CrawlConfig",
            imports,
            f"uri = {uri!r}",
            "import time; _t0 = time.perf_counter()",
            work,
            _PEAK,
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "urls.tsv"
        started = time.perf_counter()
        write_list(path, args.rows)
        written_s = time.perf_counter() - started
        file_mib = path.stat().st_size / (1 << 20)
        figures = {mode: measure(str(path), mode) for mode in MODES}
    floors = {"floor", *FLOORS.values()}
    result = {
        "benchmark": "url_list",
        "rows": args.rows,
        "file_mib": round(file_mib, 1),
        "write_s": round(written_s, 1),
        **{f"{mode}_peak_mib": f["peak_mib"] for mode, f in figures.items()},
        **{f"{mode}_s": f["seconds"] for mode, f in figures.items() if mode not in floors},
        **{
            f"{mode}_above_floor_mib": round(
                f["peak_mib"] - figures[FLOORS.get(mode, "floor")]["peak_mib"], 1
            )
            for mode, f in figures.items()
            if mode not in floors
        },
        **{
            f"{mode}_rows_per_s": round(args.rows / max(figures[mode]["seconds"], 1e-9))
            for mode in ("streamed", "prepare_input")
        },
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
