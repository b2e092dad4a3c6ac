"""The whole pipeline under Prefect, as `dalle demo` and `dalle pipeline` run it: once on the
built-in source, once on a headerless TSV URL list (CC3M's layout) named by the config only."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dalle.config import config_from_dict, load_config
from dalle.curate.crawl import CrawlError
from dalle.models.weights import load_dvae
from dalle.runroot import CURATED_DIR, EVAL_PROMPTS, EVAL_REPORT, GALLERY_INDEX, SOURCE_DIR
from dalle.storage import Storage
from dalle.tokens.loader import read_listed_shards
from demo.site import DemoServer, build_site, url_table
from demo.world import world_config
from tests.test_benchmarks import REPO
from tests.test_cli import run_cli
from tests.test_train import SETTINGS

TINY = {
    "plugins": {
        "demo": {
            "num_images": 120,
            "image_size": 48,
            "exact_duplicates": 4,
            "near_duplicates": 4,
            "suite_prompts_per_kind": 1,
        }
    },
    "crawl": {"processes": 1, "threads": 8, "timeout_s": 5, "samples_per_shard": 64},
    "filter": {"min_side": 24, "min_image_bytes": 20},
    "clip": {
        "small": {
            "image_size": 32,
            "embed_dim": 32,
            "vision_width": 32,
            "vision_layers": 1,
            "patch_size": 8,
            "text_width": 32,
            "text_layers": 1,
            "text_heads": 2,
        }
    },
    "train_clip": {"max_steps": 20, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 10},
    "dedup": {"vectors": "clip_tokens", "near_threshold": 0.95},
    **SETTINGS,
    # Trained with captions dropped, sampled with classifier-free guidance, as the demo is.
    "transformer": {**SETTINGS["transformer"], "cond_drop_prob": 0.1},
    "gallery": {
        "samples_per_prompt": 4,
        "top": 2,
        "validation_prompts": 2,
        "completions": 1,
        "cond_scale": 2.0,
    },
}


def _write_config(path, settings: dict) -> str:
    config_from_dict(settings)  # a bad fixture fails here, not in the child process
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _check_galleries(storage: Storage) -> None:
    """A gallery for each transformer checkpoint (3 and 6), listed on the index page."""
    index = storage.read_bytes(GALLERY_INDEX).decode()
    for step in (3, 6):
        page = f"step_{step:08d}"
        assert storage.exists(f"galleries/{page}/index.html")
        assert storage.exists(f"galleries/{page}/scores.parquet")
        assert f"{page}/index.html" in index


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_the_zero_shot_figures(tmp_path, prefect_server):
    root = tmp_path / "demo"
    config = _write_config(tmp_path / "demo.yaml", TINY)
    done = run_cli("demo", "--out", str(root), "--config", config)
    assert done.returncode == 0, done.stderr[-4000:]

    storage = Storage(str(root))
    curate = storage.read_json("reports/curate.json")
    assert curate["kept"] > 100 and curate["duplicates_exact"] >= 4
    assert storage.read_json("models/dvae/latest.json")["step"] == 6
    assert storage.read_json("models/transformer/latest.json")["step"] == 6
    _check_galleries(storage)

    evaluation = storage.read_json(EVAL_REPORT)
    assert evaluation["step"] == 6
    assert evaluation["sampling"]["cond_scale"] == 2.0 and evaluation["sampling"]["samples_per_prompt"] == 4
    assert evaluation["samples_per_prompt"] == 4 and evaluation["reranked_top"] == 2
    levels = evaluation["levels"]
    assert list(levels) == ["seen", "heldout_combos", "heldout_pairings", "heldout_counts"]
    assert list(levels["heldout_pairings"]["tasks"]) == ["two_object", "position", "color_attr"]
    for figures in levels.values():
        for cell in figures["tasks"].values():
            assert cell["images"] == 4 * cell["prompts"] and cell["kept"] == 2 * cell["prompts"]
            assert 0.0 <= cell["before"] <= 1.0 and 0.0 <= cell["after"] <= 1.0
        assert 0.0 <= figures["overall"]["after"] <= 1.0
    # The suite's prompts, one JSON object per line, to judge any model's images alike.
    prompts = [json.loads(line) for line in storage.read_bytes(EVAL_PROMPTS).decode().splitlines()]
    assert len(prompts) == 11 and {p["level"] for p in prompts} == set(levels)
    # The command ends with the figures and where the gallery is.
    assert "evaluation (step 6" in done.stdout
    assert re.search(r"^  heldout_pairings +- +[01]\.\d\d/[01]\.\d\d", done.stdout, re.MULTILINE)
    assert done.stdout.strip().splitlines()[-1] == f"gallery: {storage.uri(GALLERY_INDEX)}"
    assert "sampled with samples_per_prompt 4, top 2" in done.stdout
    # Every stage's wall time, in reports/timings.json and at the end of the output.
    timings = storage.read_json("reports/timings.json")
    stages = ["prepare_input", "crawl", "filter", "train_clip", "score", "dedup", "publish"]
    stages += ["train_dvae", "tokenize", "train_transformer", "gallery"]
    assert list(timings["stages"]) == stages
    assert all(timings["stages"][name]["seconds"] > 0 for name in stages)
    assert timings["stages"]["gallery"]["runs"] == 2  # the checkpoints at steps 3 and 6
    assert timings["total_s"] == pytest.approx(
        sum(s["seconds"] for s in timings["stages"].values()), abs=0.01
    )
    assert "wall time per stage (reports/timings.json)" in done.stdout
    assert re.search(r"^  train_transformer +[0-9]", done.stdout, re.MULTILINE)

    # The sampling benchmark compares settings on this run's last checkpoint, writing nothing to it.
    files_before = sorted(p for p in root.rglob("*") if p.is_file())
    bench = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_sampling.py"), "--run", str(root)]
        + ["--variant", "cond_scale=1,relation_weight=0", "--variant", "cond_scale=2,temperature=0.5,top_k=3"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads(bench.stdout.strip().splitlines()[-1])
    assert report["step"] == 6 and report["baseline"]["sampling"]["cond_scale"] == 2.0
    assert [v["sampling"]["cond_scale"] for v in report["variants"]] == [1.0, 2.0]
    assert report["variants"][1]["sampling"]["top_k"] == 3
    assert [v["sampling"]["relation_weight"] for v in report["variants"]] == [0.0, 1.0]
    for measured in [report["baseline"], *report["variants"]]:
        assert set(measured["eval"]) == set(levels)
        assert all(
            0.0 <= v <= 1.0
            for cells in measured["eval"].values()
            for cell in cells.values()
            for v in cell.values()
        )
    # The baseline is the gallery's own sampling: the same figures as its eval.json.
    assert report["baseline"]["eval"]["heldout_combos"]["colors"]["before"] == pytest.approx(
        levels["heldout_combos"]["tasks"]["colors"]["before"], abs=1e-3
    )
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files_before

    # The GPU demo's preset (configs/demo-gpu.yaml: a 16x16 code grid at 64 px, larger models, bf16,
    # hard negatives) trains and is judged on this run's curated pairs, at a tiny CPU setting: two
    # steps of each model at batch 8, two samples a prompt, the run's own small CLIP.
    tiny_gpu = [
        "--dvae-steps", "2", "--transformer-steps", "2", "--device", "cpu",
        "--set", "train_dvae.batch_size=8", "--set", "train_transformer.batch_size=8",
        "--set", "gallery.samples_per_prompt=2", "--set", "gallery.batch_size=2",
        "--set", "gallery.completions=0", "--set", "plugins.demo={suite_prompts_per_kind: 1}",
        "--set", f"clip.small={json.dumps(TINY['clip']['small'])}",
    ]  # fmt: skip
    gpu = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_demo_models.py"), "--from", str(root),
         "--out", str(tmp_path / "gpu-preset"), "--config", str(REPO / "configs" / "demo-gpu.yaml"), *tiny_gpu],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    measured = json.loads(gpu.stdout.strip().splitlines()[-1])
    assert measured["transformer_steps"] == 2 and set(measured["eval"]) == set(levels)
    gpu_storage = Storage(str(tmp_path / "gpu-preset"))
    assert load_dvae(gpu_storage)[0].grid == 16

    # The CLIP alone retrained (two steps, with mirrored twins), the run's dVAE and transformer kept: the
    # gallery draws the very same samples, so every figure before reranking is the run's own.
    clip_only = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_demo_models.py"), "--from", str(root),
         "--out", str(tmp_path / "clip-only"), "--config", str(root / "config.yaml"), "--retrain", "clip",
         "--device", "cpu", "--set", "train_clip.max_steps=2", "--set", "clip.mirrored_captions=demo.negatives"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert clip_only.returncode == 0, clip_only.stderr[-3000:]
    measured = json.loads(clip_only.stdout.strip().splitlines()[-1])
    assert (
        measured["retrain"] == "clip" and measured["transformer_steps"] == 6 and measured["clip_steps"] == 2
    )
    assert Storage(str(tmp_path / "clip-only")).read_json("models/clip/latest.json")["step"] == 2
    for level, cells in measured["eval"].items():
        for task, cell in cells.items():
            source = levels[level]["tasks"][task] if task in levels[level]["tasks"] else levels[level][task]
            assert cell["before"] == pytest.approx(source["before"], abs=1e-3), (level, task)

    # Where composition is lost: the dVAE's ceiling, the CLIP's and the reranker's preferences, the oracle.
    files_before = sorted(p for p in root.rglob("*") if p.is_file())
    lost = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_composition.py"), "--run", str(root), "--images", "2"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert lost.returncode == 0, lost.stderr[-3000:]
    lost = json.loads(lost.stdout.strip().splitlines()[-1])
    assert set(lost["dvae_ceiling"]) == set(levels) and set(lost["model_oracle_after"]) == set(levels)
    relation_levels = {level for level, kinds in lost["clip_prefers_right"].items() if "relation" in kinds}
    assert relation_levels and set(lost["reranker_prefers_right_relation"]) == relation_levels
    assert all(0.0 <= v <= 1.0 for v in lost["reranker_prefers_right_relation"].values())
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files_before

    # In Python: one object bundles the checkpoint with its dVAE, tokenizer and the run's CLIP.
    from dalle.sample.rerank import SamplingSettings
    from dalle.sample.sampler import Sampler

    sampler = Sampler.from_checkpoint(storage.uri("models/transformer/step_00000006"))
    assert sampler.clip is not None and sampler.checkpoint == storage.uri("models/transformer/step_00000006")
    drawn_here = sampler.sample("a red circle", SamplingSettings(num_samples=3, top=1, batch_size=3))
    assert len(drawn_here.images) == 3 and sorted(drawn_here.ranking) == [0, 1, 2]

    # A person's own prompt: the best --top of -n samples, with their scores and how they were drawn.
    mine = tmp_path / "mine"
    drawn = run_cli(
        "sample", "--checkpoint", storage.uri("models/transformer/step_00000006"),
        "--prompt", "a red circle above a blue square", "-n", "5", "--top", "2", "--cond-scale", "1.5", "--out", str(mine),
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    scores = json.loads((mine / "scores.json").read_text())
    assert [image["file"] for image in scores["images"]] == ["sample_00.png", "sample_01.png"]
    # A relation prompt: ranked by CLIP's score plus the relation margin (gallery.relation_weight 1).
    assert scores["sampling"]["relation_weight"] == 1.0
    best, second = ((i["clip_score"] + i["relation_margin"]) for i in scores["images"])
    assert best >= second
    assert scores["samples"] == 5 and scores["sampling"]["cond_scale"] == 1.5  # the flag, not the run's 2
    assert PIL.Image.open(mine / "sample_01.png").mode == "RGB"
    refused = run_cli(
        "sample", "--checkpoint", storage.uri("models/transformer/step_00000006"), "--prompt", "a red circle",
        "--top-k", "0", "--out", str(tmp_path / "refused"),
    )  # fmt: skip
    assert refused.returncode == 2 and "--top-k: must be a positive integer" in refused.stderr
    assert not (tmp_path / "refused").exists()

    # One checkpoint's gallery by hand; the Prefect UI shows each gallery's figures and settings.
    again = run_cli(
        "gallery", "--checkpoint", storage.uri("models/transformer/step_00000003"), "--out", str(root)
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == storage.uri("galleries/step_00000003/index.html")
    assert storage.read_json(EVAL_REPORT)["step"] == 3
    from prefect import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert {"gallery-prompts", "gallery-summary", "gallery"} <= {a.key for a in artifacts}
    summaries = [a.data for a in artifacts if a.key == "gallery-summary"]
    assert any("**heldout_combos**" in text and "cond_scale 2.0" in text for text in summaries)

    # A re-run trains nothing more, but redraws a gallery that is missing (a run stopped before it)
    # or was drawn with other gallery settings, and leaves a current one alone.
    shutil.rmtree(root / "galleries" / "step_00000003")
    fewer = {**TINY, "gallery": {**TINY["gallery"], "samples_per_prompt": 3}}
    config = _write_config(tmp_path / "fewer.yaml", fewer)
    rerun = run_cli("demo", "--out", str(root), "--config", config)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert storage.read_json("models/transformer/latest.json")["step"] == 6
    for step in (3, 6):
        summary = storage.read_json(f"galleries/step_{step:08d}/summary.json")
        assert summary["sampling"]["samples_per_prompt"] == 3
    assert storage.read_json(EVAL_REPORT)["samples_per_prompt"] == 3
    drawn_at = {p: p.stat().st_mtime_ns for p in (root / "galleries").rglob("summary.json")}
    assert run_cli("demo", "--out", str(root), "--config", config).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (root / "galleries").rglob("summary.json")} == drawn_at

    # Retraining: the URL list grows by the rows of another site; `dalle ingest` crawls only those,
    # curates them with the rest, tokenizes the new pairs and announces the new shards; the
    # transformer then resumes for more steps over every shard.
    rows_before = storage.read_json("shards/_manifest.json")["rows"]
    more = build_site(world_config(config_from_dict({"plugins": {"demo": {"num_images": 24, "seed": 7}}})))
    with DemoServer(more, port=0) as extra:
        grown = pa.concat_tables([storage.read_table("source/urls.parquet"), url_table(more, extra.base_url)])
        pq.write_table(grown, tmp_path / "grown.parquet")
        ingested = run_cli("--json", "ingest", "--out", str(root), "--urls", str(tmp_path / "grown.parquet"))
        assert ingested.returncode == 0, ingested.stderr[-4000:]
        new_rows = len(more.rows)
        assert sum(extra.requests.values()) <= new_rows + 1  # the new rows (and robots.txt) only
    result = json.loads(ingested.stdout)
    assert result["curate"]["input_rows"] == grown.num_rows
    assert storage.read_json("raw/batch_0001/_input/_manifest.json")["input_rows"] == new_rows
    rows_after = storage.read_json("shards/_manifest.json")["rows"]
    assert rows_after > rows_before
    with get_client(sync_client=True) as client:
        from prefect.events.filters import EventFilter, EventNameFilter

        deadline = time.monotonic() + 30
        while not [
            e
            for e in client.read_events(
                EventFilter(event=EventNameFilter(name=["dalle.shards.updated"])), limit=50
            ).events
            if e.resource.id == storage.uri()
        ]:
            assert time.monotonic() < deadline, "no dalle.shards.updated event for the run root"
            time.sleep(1)
    retrained = run_cli("train", "--out", str(root), "--more-steps", "2")
    assert retrained.returncode == 0, retrained.stderr[-4000:]
    assert storage.read_json("models/transformer/latest.json")["step"] == 8


def _secrets_found(secrets: list[str], texts: list[str], folders: list, bucket: str) -> list[str]:
    """Where any of `secrets` appears: in `texts`, in a file under `folders`, in an object of the S3
    `bucket` (each secret also searched for in its URL-quoted and base64 forms)."""
    import base64
    import urllib.parse

    import boto3

    forms = {
        form.encode()
        for secret in secrets
        for form in (secret, urllib.parse.quote(secret, safe=""), base64.b64encode(secret.encode()).decode())
    }
    found = [f"output {i}" for i, text in enumerate(texts) if any(f.decode() in text for f in forms)]
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and any(f in path.read_bytes() for f in forms):
                found.append(str(path))
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if any(f in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read() for f in forms):
                found.append(f"s3://{bucket}/{obj['Key']}")
    return found


@pytest.mark.slow
def test_a_headerless_tsv_url_list_runs_by_config_alone_on_s3_and_leaks_no_secret(
    tmp_path, prefect_server, s3_bucket, monkeypatch
):
    """The CC3M preset's crawl settings, pointed at a loopback copy of the shapes, into a bucket; the
    secrets in the environment and the password in one URL of the list appear in no output, object,
    file, or Prefect record (logs at DEBUG, artifacts, events, parameters: the whole API database is
    searched)."""
    import secrets as random_secrets

    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    planted = {
        "AWS_SECRET_ACCESS_KEY": "s3cret-" + random_secrets.token_hex(16),
        "MLFLOW_TRACKING_PASSWORD": "mlflow-" + random_secrets.token_hex(16),
        "WANDB_API_KEY": "wandb-" + random_secrets.token_hex(16),
    }
    for key, value in planted.items():
        monkeypatch.setenv(key, value)  # moto accepts any credentials; run_cli passes the environment
    planted["URL_PASSWORD"] = "urlpass-" + random_secrets.token_hex(
        16
    )  # in the URL list, not the environment
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    preset = load_config("configs/cc3m.yaml")
    site = build_site(world_config(config_from_dict(TINY)))
    with DemoServer(site) as server:
        lines = [f"{caption}\t{server.url(path)}" for path, caption in site.rows[:80]]
        # A URL that carries a password: refused (credentials_in_url), and the password kept nowhere.
        path, caption = site.rows[0]
        userinfo_url = server.url(path).replace("://", f"://crawler:{planted['URL_PASSWORD']}@", 1)
        lines.append(f"{caption}\t{userinfo_url}")
        url_list = tmp_path / "Train_GCC-training.tsv"
        url_list.write_text("\n".join(lines) + "\n", encoding="utf-8")
        settings = {
            **TINY,
            "source": {"urls": str(url_list)},
            "crawl": {
                **TINY["crawl"],
                "input_format": preset.crawl.input_format,
                "column_names": preset.crawl.column_names,
                "allow_networks": ["127.0.0.1/32"],
            },
        }
        root = f"{s3_bucket}/web"
        done = run_cli("pipeline", "--out", root, "--config", _write_config(tmp_path / "web.yaml", settings))
    assert done.returncode == 0, done.stderr[-4000:]

    storage = Storage(root)
    curate = storage.read_json("reports/curate.json")
    assert curate["input_rows"] == 81 and curate["downloaded"] == 80
    assert curate["blocked"] == {"credentials_in_url": 1}
    captions = set(read_listed_shards(storage, CURATED_DIR, ["caption"]).column("caption").to_pylist())
    assert captions <= {caption for _, caption in site.rows[:80]}
    _check_galleries(storage)
    # Not the shapes source: no demo server, no held-out prompts, no zero-shot figures.
    assert not storage.list(SOURCE_DIR) and not storage.exists(EVAL_REPORT)
    page = storage.read_bytes("galleries/step_00000006/index.html").decode()
    assert "Captions from the data" in page

    database = PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[-1]
    prefect_files = pathlib.Path(database).parent
    assert prefect_files.is_dir() and any(prefect_files.glob("*.db")), database
    # A planted secret is found where it is (the check can fail), then nowhere the run wrote.
    (tmp_path / "canary.txt").write_text(planted["WANDB_API_KEY"])
    bucket = s3_bucket.removeprefix("s3://")
    assert _secrets_found([planted["WANDB_API_KEY"]], [], [tmp_path], bucket) == [
        str(tmp_path / "canary.txt")
    ]
    (tmp_path / "canary.txt").unlink()
    assert "DEBUG" in done.stderr + done.stdout, "the child did not log at DEBUG"
    url_list.unlink()  # the input holds the URL's password; nothing the run wrote may
    leaks = _secrets_found(
        list(planted.values()), [done.stdout, done.stderr], [tmp_path, prefect_files], bucket
    )
    assert leaks == [], f"a secret was written to {leaks}"


def test_the_demo_source_serves_on_one_port_so_runs_share_their_uids(tmp_path, monkeypatch):
    import socket

    import demo.run
    from tests.conftest import free_port

    port = free_port()  # stands in for DEMO_PORT, which another process here may hold
    monkeypatch.setattr(demo.run, "DEMO_PORT", port)
    site = build_site(world_config(config_from_dict(TINY)))
    with demo.run.demo_server(site, Storage(str(tmp_path / "a"))) as first:
        assert first.port == port
    with demo.run.demo_server(site, Storage(str(tmp_path / "b"))) as second:
        assert second.port == port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with demo.run.demo_server(site, Storage(str(tmp_path / "c"))) as third:
            assert third.port != port
        # A re-run of a run whose stored port is taken is told so, not handed a traceback.
        storage = Storage(str(tmp_path / "d"))
        storage.write_json(demo.run.DEMO_SERVER, {"port": port, "base_url": f"http://127.0.0.1:{port}"})
        with pytest.raises(CrawlError, match=f"serves on 127.0.0.1:{port} .* stop what holds it"):
            demo.run.demo_server(site, storage)


def test_the_pipeline_without_a_url_list_says_what_to_do(tmp_path, prefect_server):
    done = run_cli("pipeline", "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "source.urls is not set" in done.stderr and "dalle demo" in done.stderr
