"""Crawl throughput: the crawl stage against bare `img2dataset.download`, same list, same run.

Both download the same loopback URL list with the same processes, threads and output
options; the crawl stage adds its input preparation (URL checks, robots.txt) and the
network guard in img2dataset's workers. Prints both throughputs and their ratio (goal
>= 0.9); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

import dalle  # noqa: F401  (first: it turns off albumentations' update check)
import img2dataset
from dalle.config import CrawlConfig, SourceConfig
from dalle.data.crawl import img2dataset_arguments, prepare_input, run_crawl
from dalle.data.sources import DemoServer, build_site
from dalle.storage import Storage


def url_list(server: DemoServer, paths: list[str], n: int) -> pa.Table:
    # Distinct URLs (a query string the server ignores), so no row is a repeat.
    urls = [f"{server.url(paths[i % len(paths)])}?n={i}" for i in range(n)]
    return pa.table({"url": urls, "caption": [f"a shape number {i}" for i in range(n)]})


def bare(urls_file: str, out: str, cfg: CrawlConfig) -> float:
    args = img2dataset_arguments(Storage(out), cfg)
    args["url_list"] = urls_file
    start = time.perf_counter()
    img2dataset.download(**{**args, "save_additional_columns": None})
    return time.perf_counter() - start


def stage(urls_file: str, out: str, cfg: CrawlConfig) -> float:
    storage = Storage(out)
    start = time.perf_counter()
    run_crawl(storage, cfg, prepare_input(urls_file, storage, cfg))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4000, help="URLs per run")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts")
    args = parser.parse_args()

    cfg = CrawlConfig(
        allow_networks=["127.0.0.0/8"],
        processes=args.processes,
        threads=args.threads,
        samples_per_shard=max(1, args.n // (2 * args.processes)),
    )
    site = build_site(SourceConfig(num_images=500, exact_duplicates=0, near_duplicates=0))
    bare_s, stage_s = [], []
    with DemoServer(site) as server, tempfile.TemporaryDirectory() as tmp:
        urls_file = str(Path(tmp) / "urls.parquet")
        Storage(tmp).write_table("urls.parquet", url_list(server, [p for p, _ in site.rows], args.n))
        for repeat in range(args.repeats):
            bare_s.append(bare(urls_file, f"{tmp}/bare{repeat}", cfg))
            stage_s.append(stage(urls_file, f"{tmp}/stage{repeat}", cfg))
            print(f"run {repeat}: bare {bare_s[-1]:.2f}s, crawl stage {stage_s[-1]:.2f}s", file=sys.stderr)
    bare_rate, stage_rate = args.n / min(bare_s), args.n / min(stage_s)
    print(
        json.dumps(
            {
                "urls": args.n,
                "processes": args.processes,
                "threads": args.threads,
                "bare_img2dataset_urls_per_s": round(bare_rate, 1),
                "crawl_stage_urls_per_s": round(stage_rate, 1),
                "ratio": round(stage_rate / bare_rate, 3),
                "goal_ratio": 0.9,
            }
        )
    )


if __name__ == "__main__":
    main()
