"""Crawl throughput: the crawl stage against bare `img2dataset.download`, same list, same run.

Both download the same loopback URL list with the same processes, threads and output
options; the crawl stage adds its input preparation (URL checks, robots.txt) and the
network guard in img2dataset's workers. Both are timed as a user runs them: bare
img2dataset in a fresh Python process (its ~3 s import included), the stage as a call
that starts its own img2dataset process. The bare run with img2dataset already imported
is reported too.

Two cases (`--hosts`, default 1,64):

- one host: every URL on one server at 127.0.0.1, so robots.txt is one fetch;
- N hosts: the URLs spread round-robin over N servers, each with its own robots.txt, on the
  loopback aliases 127.0.0.1, 127.0.0.2, ... (Linux routes all of 127/8 to lo). The stage
  reaches them by name, site0.crawl.test ... site{N-1}.crawl.test, through the static host
  map `crawl.resolve` (no DNS), so input preparation reads N robots.txt files before
  img2dataset starts and its workers connect to N hosts. Bare img2dataset has no such map:
  its list names the same servers by address (the same URLs otherwise).

For each case: the throughputs, their ratio (goal >= 0.9), and the stage's time split into
input preparation (URL checks and the robots.txt fetches) and img2dataset (its process,
import included). The last line is one JSON object with every case.

    python benchmarks/bench_crawl.py                       # 6,000 URLs, 1 and 64 hosts
    python benchmarks/bench_crawl.py --urls 2000 --hosts 64
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
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
from dalle.curate.crawl import finished_shards, img2dataset_arguments, prepare_input, run_crawl
from dalle.storage import Storage
from demo.site import DemoServer, DemoSite, build_site
from demo.world import WorldConfig

FIRST_ADDRESS = ipaddress.IPv4Address("127.0.0.1")
MAX_HOSTS = 1000  # 127.0.0.1 .. 127.0.3.232: all loopback


def host_name(index: int) -> str:
    return f"site{index}.crawl.test"


def host_counts(text: str) -> list[int]:
    """--hosts: a comma-separated list of host counts, each 1..MAX_HOSTS."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected host counts like 1,64, not {text!r}") from None
    if not counts or any(not 1 <= count <= MAX_HOSTS for count in counts):
        raise argparse.ArgumentTypeError(f"each host count must be 1..{MAX_HOSTS}, not {text!r}")
    return list(dict.fromkeys(counts))


def url_table(bases: list[str], paths: list[str], n: int) -> pa.Table:
    # Distinct URLs (a query string the server ignores), so no row is a repeat; host i % len(bases).
    urls = [f"{bases[i % len(bases)]}/{paths[i % len(paths)]}?n={i}" for i in range(n)]
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


def stage(urls_file: str, out: str, cfg: CrawlConfig) -> tuple[float, float, int]:
    """(input preparation s, img2dataset s, images fetched) of the crawl stage on the list."""
    storage = Storage(out)
    start = time.perf_counter()
    prepared = prepare_input(urls_file, storage, cfg)
    prepared_at = time.perf_counter()
    run_crawl(storage, cfg, prepared, log=lambda line: None)
    done = time.perf_counter()
    fetched = sum(
        storage.read_table(rel).column("status").to_pylist().count("success")
        for rel in finished_shards(storage)
    )
    return prepared_at - start, done - prepared_at, fetched


def run_case(site: DemoSite, hosts: int, args: argparse.Namespace, tmp: str) -> dict:
    paths = [path for path, _ in site.rows]
    addresses = [str(FIRST_ADDRESS + index) for index in range(hosts)]
    resolve = {host_name(index): address for index, address in enumerate(addresses)} if hosts > 1 else {}
    cfg = CrawlConfig(
        allow_networks=["127.0.0.0/8"],
        resolve=resolve,
        processes=args.processes,
        threads=args.threads,
        samples_per_shard=max(1, args.n // (2 * args.processes)),
    )
    folder = Path(tmp) / f"hosts{hosts}"
    with contextlib.ExitStack() as servers:
        robots = [f"# {host_name(index)}\nUser-agent: *\nDisallow: /private/\n" for index in range(hosts)]
        running = [
            servers.enter_context(DemoServer(site, host=address, robots_txt=text))
            for address, text in zip(addresses, robots)
        ]
        by_address = [server.base_url for server in running]
        by_name = [f"http://{host_name(i)}:{server.port}" for i, server in enumerate(running)]
        storage = Storage(str(folder))
        bare_list = storage.write_table("bare_urls.parquet", url_table(by_address, paths, args.n))
        stage_list = storage.write_table(
            "urls.parquet", url_table(by_name if hosts > 1 else by_address, paths, args.n)
        )
        bare_s, imported_s, stage_runs = [], [], []
        for repeat in range(args.repeats):
            bare_s.append(bare_fresh_process(bare_list, f"{folder}/bare{repeat}", cfg))
            imported_s.append(bare_imported(bare_list, f"{folder}/imported{repeat}", cfg))
            stage_runs.append(stage(stage_list, f"{folder}/stage{repeat}", cfg))
            prepare_s, crawl_s, fetched = stage_runs[-1]
            print(
                f"{hosts} host(s), run {repeat}: bare {bare_s[-1]:.2f}s (already imported: "
                f"{imported_s[-1]:.2f}s), crawl stage {prepare_s + crawl_s:.2f}s = input preparation "
                f"{prepare_s:.2f}s + img2dataset {crawl_s:.2f}s; {fetched} of {args.n} images",
                file=sys.stderr,
            )
        robots_fetches = sum(server.count("/robots.txt") for server in running)
        # The stage's requests name the host as its URLs do (bare img2dataset's, by address).
        hosts_reached = sum(
            1 for server, base in zip(running, by_name) if base.split("//")[1] in server.host_headers
        )
    prepare_s, crawl_s, fetched = min(stage_runs, key=lambda run: run[0] + run[1])
    bare_rate = args.n / min(bare_s)
    stage_rate = args.n / (prepare_s + crawl_s)
    imported_rate = args.n / min(imported_s)
    return {
        "hosts": hosts,
        "addressed_by": "name, via crawl.resolve" if hosts > 1 else "address",
        "bare_img2dataset_urls_per_s": round(bare_rate, 1),
        "crawl_stage_urls_per_s": round(stage_rate, 1),
        "ratio": round(stage_rate / bare_rate, 3),
        "bare_already_imported_urls_per_s": round(imported_rate, 1),
        "ratio_vs_already_imported": round(stage_rate / imported_rate, 3),
        "stage_input_preparation_s": round(prepare_s, 2),
        "stage_img2dataset_s": round(crawl_s, 2),
        "bare_img2dataset_s": round(min(bare_s), 2),
        "robots_txt_fetches": robots_fetches // args.repeats,
        "hosts_reached_by_name": hosts_reached if hosts > 1 else None,
        "images_fetched": fetched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", "--urls", dest="n", type=int, default=6000, help="URLs per run")
    parser.add_argument(
        "--hosts",
        type=host_counts,
        default=[1, 64],
        help="the cases: comma-separated numbers of hosts the URLs spread over (default 1,64)",
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    args = parser.parse_args()
    if args.n < 1 or args.processes < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--urls, --processes, --threads and --repeats must be at least 1")

    site = build_site(WorldConfig(num_images=500, exact_duplicates=0, near_duplicates=0))
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(site, hosts, args, tmp) for hosts in args.hosts]
    print(
        json.dumps(
            {
                "urls": args.n,
                "processes": args.processes,
                "threads": args.threads,
                "goal_ratio": 0.9,
                "cases": cases,
            }
        )
    )


if __name__ == "__main__":
    main()
