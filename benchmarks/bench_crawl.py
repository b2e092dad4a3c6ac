"""Crawl throughput: the crawl stage against bare `img2dataset.download`, same list, same run.

Both download the same loopback URL list with the same processes, threads and output
options; the crawl stage adds its input preparation (URL checks, robots.txt) and the
network guard in img2dataset's workers. Both are timed as a user runs them: bare
img2dataset in a fresh Python process (its ~3 s import included), the stage as a call
that starts its own img2dataset process. The bare run with img2dataset already imported
is reported too. Prints the throughputs and their ratio (goal >= 0.9); the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dalle  # noqa: F401  (first: it turns off albumentations' update check)

# isort: split
import img2dataset
import pyarrow as pa

from dalle.config import CrawlConfig
from dalle.curate.crawl import img2dataset_arguments, prepare_input, run_crawl
from dalle.storage import Storage
from demo.site import DemoServer, build_site
from demo.world import WorldConfig


def url_list(server: DemoServer, paths: list[str], n: int) -> pa.Table:
    # Distinct URLs (a query string the server ignores), so no row is a repeat.
    urls = [f"{server.url(paths[i % len(paths)])}?n={i}" for i in range(n)]
    return pa.table({"url": urls, "caption": [f"a shape number {i}" for i in range(n)]})


def bare_arguments(urls_file: str, out: str, cfg: CrawlConfig) -> dict:
    args = img2dataset_arguments(Storage(out), cfg)
    return {**args, "url_list": urls_file, "save_additional_columns": None}


def bare_imported(urls_file: str, out: str, cfg: CrawlConfig) -> float:
    start = time.perf_counter()
    img2dataset.download(**bare_arguments(urls_file, out, cfg))
    return time.perf_counter() - start


def bare_fresh_process(urls_file: str, out: str, cfg: CrawlConfig) -> float:
    code = (
        "import os, json, sys; os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1'); import img2dataset; "
        "img2dataset.download(**json.loads(sys.argv[1]))"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(bare_arguments(urls_file, out, cfg))], check=True)
    return time.perf_counter() - start


def stage(urls_file: str, out: str, cfg: CrawlConfig) -> float:
    storage = Storage(out)
    start = time.perf_counter()
    run_crawl(storage, cfg, prepare_input(urls_file, storage, cfg))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=6000, help="URLs per run")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    args = parser.parse_args()

    cfg = CrawlConfig(
        allow_networks=["127.0.0.0/8"],
        processes=args.processes,
        threads=args.threads,
        samples_per_shard=max(1, args.n // (2 * args.processes)),
    )
    site = build_site(WorldConfig(num_images=500, exact_duplicates=0, near_duplicates=0))
    bare_s, imported_s, stage_s = [], [], []
    with DemoServer(site) as server, tempfile.TemporaryDirectory() as tmp:
        urls_file = str(Path(tmp) / "urls.parquet")
        Storage(tmp).write_table("urls.parquet", url_list(server, [p for p, _ in site.rows], args.n))
        for repeat in range(args.repeats):
            bare_s.append(bare_fresh_process(urls_file, f"{tmp}/bare{repeat}", cfg))
            imported_s.append(bare_imported(urls_file, f"{tmp}/imported{repeat}", cfg))
            stage_s.append(stage(urls_file, f"{tmp}/stage{repeat}", cfg))
            print(
                f"run {repeat}: bare {bare_s[-1]:.2f}s (already imported: {imported_s[-1]:.2f}s), "
                f"crawl stage {stage_s[-1]:.2f}s",
                file=sys.stderr,
            )
    bare_rate, stage_rate = args.n / min(bare_s), args.n / min(stage_s)
    imported_rate = args.n / min(imported_s)
    print(
        json.dumps(
            {
                "urls": args.n,
                "processes": args.processes,
                "threads": args.threads,
                "bare_img2dataset_urls_per_s": round(bare_rate, 1),
                "crawl_stage_urls_per_s": round(stage_rate, 1),
                "ratio": round(stage_rate / bare_rate, 3),
                "bare_already_imported_urls_per_s": round(imported_rate, 1),
                "ratio_vs_already_imported": round(stage_rate / imported_rate, 3),
                "goal_ratio": 0.9,
            }
        )
    )


if __name__ == "__main__":
    main()
