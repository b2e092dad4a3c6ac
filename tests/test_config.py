import pytest

from dalle.config import (
    ConfigError,
    RunConfig,
    SmallClipConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from demo.world import world_config


def test_demo_config_loads():
    cfg = load_config("demo/config.yaml")
    assert "127.0.0.0/8" in cfg.crawl.allow_networks
    assert world_config(cfg).heldout


def test_demo_config_is_step_bound_so_runs_repeat():
    # No wall-clock budget exists any more: the CLIP's training stops at a step count only.
    assert "max_seconds" not in TrainConfig.model_fields
    assert "max_seconds" not in SmallClipConfig.model_fields
    assert load_config("demo/config.yaml").train_clip.max_steps >= 1


def test_cc3m_preset_names_a_headerless_tsv_and_a_paper_shaped_model():
    cfg = load_config("configs/cc3m.yaml")
    assert cfg.source.urls and cfg.crawl.input_format == "tsv"
    assert cfg.crawl.column_names == ["caption", "url"]
    assert cfg.dvae.grid == 32 and cfg.dvae.codebook_size == 8192
    assert cfg.transformer.attention == "paper"
    assert cfg.crawl.allow_networks == []  # a web crawl reaches public addresses only


def test_laion_preset_reads_the_metadata_parquet_columns():
    cfg = load_config("configs/laion.yaml")
    assert cfg.source.urls.endswith(".parquet") and cfg.crawl.input_format == "parquet"
    assert (cfg.crawl.url_col, cfg.crawl.caption_col) == ("URL", "TEXT")
    assert cfg.clip.pretrained and cfg.filter.clip_score_threshold is not None
    assert cfg.dvae.grid == 32 and cfg.crawl.allow_networks == []


def test_every_field_has_a_description():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}{name}.")

    walk(RunConfig)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("crawl:\n  alow_networks: ['127.0.0.0/8']\n")
    with pytest.raises(ConfigError, match="unknown key 'crawl.alow_networks'"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown key 'crawler'"):
        config_from_dict({"crawler": {}})


def test_bad_cidr_and_bad_heldout_explained():
    with pytest.raises(ConfigError, match="not a CIDR"):
        config_from_dict({"crawl": {"allow_networks": ["localhost"]}})
    with pytest.raises(ConfigError, match="held-out combination 'pink circle'"):
        world_config(config_from_dict({"plugins": {"demo": {"heldout": ["pink circle"]}}}))


def test_both_clip_rules_rejected():
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"filter": {"clip_score_threshold": 0.2, "clip_keep_top_fraction": 0.5}})


def test_guidance_without_dropped_captions_rejected():
    with pytest.raises(ConfigError, match=r"gallery.cond_scale 2.0 .* needs transformer.cond_drop_prob > 0"):
        config_from_dict({"gallery": {"cond_scale": 2.0}})
    assert config_from_dict({"gallery": {"cond_scale": 2.0}, "transformer": {"cond_drop_prob": 0.1}})


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("crawl: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(top)


def test_dump_roundtrip_and_fingerprint():
    cfg = config_from_dict({"dedup": {"near_threshold": 0.9}})
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert cfg.fingerprint("dedup") != RunConfig().fingerprint("dedup")
    assert cfg.fingerprint("crawl") == RunConfig().fingerprint("crawl")


# A run config as an older release dumped it: the demo world's settings under `source` (no URL
# list) and the small CLIP's architecture and optimisation together under `clip.train`.
OLDER_RELEASE_DUMP = """
source:
  urls: null
  seed: 3
  num_images: 500
  image_size: 48
  colors: [red, green, blue]
  shapes: [circle, square]
  heldout: [red square]
  pair_fraction: 0.1
  exact_duplicates: 5
  near_duplicates: 6
clip:
  model: ViT-B-32
  pretrained: null
  checkpoint: null
  train:
    image_size: 32
    embed_dim: 64
    vision_width: 64
    vision_layers: 2
    patch_size: 8
    text_width: 64
    text_layers: 2
    text_heads: 2
    context_length: 16
    batch_size: 48
    lr: 0.002
    max_steps: 700
    seed: 9
    max_seconds: null
  batch_size: 128
  device: auto
gallery:
  samples_per_prompt: 16
"""


def test_older_release_run_config_loads():
    import yaml

    cfg = config_from_dict(yaml.safe_load(OLDER_RELEASE_DUMP), origin="run.yaml")
    assert cfg.source.urls is None
    assert cfg.plugins["demo"] == {
        "seed": 3,
        "num_images": 500,
        "image_size": 48,
        "colors": ["red", "green", "blue"],
        "shapes": ["circle", "square"],
        "heldout": ["red square"],
        "pair_fraction": 0.1,
        "exact_duplicates": 5,
        "near_duplicates": 6,
    }
    world = world_config(cfg)
    assert (world.seed, world.num_images, world.image_size, world.heldout) == (3, 500, 48, ["red square"])
    assert cfg.gallery.evaluator == "demo.evaluation"
    assert cfg.gallery.samples_per_prompt == 16  # the rest of the section is kept
    assert cfg.clip.small == SmallClipConfig(
        image_size=32, embed_dim=64, vision_width=64, vision_layers=2, patch_size=8,
        text_width=64, text_layers=2, text_heads=2, context_length=16,
    )  # fmt: skip
    assert (cfg.train_clip.batch_size, cfg.train_clip.lr, cfg.train_clip.max_steps, cfg.train_clip.seed) == (
        48, 0.002, 700, 9,
    )  # fmt: skip
    # Dumped again, it is a config of today's release and loads the same.
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_older_release_with_a_url_list_is_no_demo_run():
    cfg = config_from_dict({"source": {"urls": "s3://bucket/urls.parquet", "seed": 1, "num_images": 10}})
    assert cfg.source.urls == "s3://bucket/urls.parquet"
    assert "demo" not in cfg.plugins and cfg.gallery.evaluator is None


def test_older_release_clip_time_budget_is_refused():
    import yaml

    data = yaml.safe_load(OLDER_RELEASE_DUMP)
    data["clip"]["train"]["max_seconds"] = 240
    with pytest.raises(ConfigError, match=r"clip\.train\.max_seconds"):
        config_from_dict(data, origin="run.yaml")


def test_a_partial_training_section_keeps_that_models_own_defaults():
    cfg = config_from_dict({"train_clip": {"max_steps": 7}, "train_dvae": {"lr": 0.01}})
    clip_defaults, dvae_defaults = RunConfig().train_clip, RunConfig().train_dvae
    assert cfg.train_clip.max_steps == 7
    assert cfg.train_clip.model_dump(exclude={"max_steps"}) == clip_defaults.model_dump(exclude={"max_steps"})
    assert cfg.train_dvae.lr == 0.01 and cfg.train_dvae.grad_clip is dvae_defaults.grad_clip is None
    assert cfg.train_dvae.betas == dvae_defaults.betas != RunConfig().train_transformer.betas


def test_a_config_is_read_from_a_path_or_an_s3_uri(tmp_path, s3_bucket):
    from dalle.config import as_config
    from dalle.storage import Storage

    text = "orchestration:\n  retrain_steps: 7\n"
    (tmp_path / "c.yaml").write_text(text)
    Storage(f"s3://{s3_bucket}/configs").write_bytes("main.yaml", text.encode())
    for where in (str(tmp_path / "c.yaml"), f"s3://{s3_bucket}/configs/main.yaml"):
        assert as_config(where).orchestration.retrain_steps == 7
    with pytest.raises(ConfigError, match="does not exist"):
        as_config(f"s3://{s3_bucket}/configs/missing.yaml")


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("gallery:\n  prompts_file: caf\xe9.txt\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text .* save it as UTF-8"):
        load_config(path)


def test_nproc_auto_is_one_process_per_gpu_and_bad_values_are_refused():
    import torch

    from dalle.train.launch import training_settings

    cfg = config_from_dict({"train_transformer": {"nproc": "auto"}})
    assert training_settings("transformer", cfg).nproc == max(1, torch.cuda.device_count())
    for bad in (0, "all"):
        with pytest.raises(ConfigError, match="nproc"):
            config_from_dict({"train_dvae": {"nproc": bad}})
    with pytest.raises(ConfigError, match="'max_steps': Input should be greater than or equal to 1"):
        training_settings("dvae", cfg, max_steps=0)


# --- nonsense values are refused where they enter, with the key named ----------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train_dvae": {"lr": float("nan")}}, r"'train_dvae.lr' .*finite number"),
        ({"gallery": {"temperature": float("inf")}}, r"'gallery.temperature' .*finite number"),
        ({"train_transformer": {"betas": [0.9, float("nan")]}}, r"'train_transformer.betas.1' .*finite"),
        ({"train_transformer": {"betas": [0.9, 1.5]}}, r"'train_transformer.betas.1' .*less than 1"),
        ({"crawl": {"timeout_s": float("inf")}}, r"'crawl.timeout_s' .*finite number"),
        (
            {"orchestration": {"train_timeout_s": 1e12}},
            r"'orchestration.train_timeout_s' .*less than or equal",
        ),
        ({"train_clip": {"max_steps": 0}}, r"'train_clip.max_steps' .*greater than or equal to 1"),
        ({"orchestration": {"retrain_steps": -5}}, r"'orchestration.retrain_steps' .*greater than or equal"),
        ({"train_dvae": {"seed": -1}}, r"'train_dvae.seed' .*greater than or equal to 0"),
        ({"gallery": {"seed": 2**70}}, r"'gallery.seed' .*less than or equal"),
        ({"gallery": {"cond_scale": -2.0}}, r"'gallery.cond_scale' .*greater than or equal to 0"),
        (
            {"filter": {"clip_score_threshold": 1.5}},
            r"'filter.clip_score_threshold' .*less than or equal to 1",
        ),
        ({"filter": {"min_caption_words": 90}}, r"min_caption_words 90 is above max_caption_words 80"),
        ({"crawl": {"url_col": "text", "caption_col": "text"}}, r"url_col and caption_col both name 'text'"),
        ({"crawl": {"column_names": ["url", "url"]}}, r"column_names repeats \['url'\]"),
        ({"crawl": {"user_agent_token": "bot\r\nX-Injected: 1"}}, r"'crawl.user_agent_token' .*pattern"),
        ({"source": {"urls": "  "}}, r"'source.urls' .*not blank"),
        ({"clip": {"checkpoint": ""}}, r"'clip.checkpoint' .*at least 1 character"),
    ],
)
def test_nonsense_values_are_refused_with_their_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_a_float_written_as_yaml_nan_or_inf_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dvae:\n  kl_weight: .nan\ntrain_dvae:\n  grad_clip: .inf\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "'dvae.kl_weight'" in str(raised.value) and "'train_dvae.grad_clip'" in str(raised.value)


def test_every_number_has_a_lower_bound_and_every_duration_an_upper_one():
    """The class of hole, not one instance: a new numeric setting without a range fails here."""
    import typing

    from annotated_types import Ge, Gt, Le, Lt

    from dalle.config import MAX_SECONDS

    unbounded_by_design = {"TrainConfig.nproc"}  # int or 'auto', checked by its own validator

    def numeric(annotation) -> bool:
        return annotation in (int, float) or any(numeric(a) for a in typing.get_args(annotation))

    def constraints(annotation, metadata) -> list:
        """The field's constraints, or, for a tuple, those every element has."""
        if typing.get_origin(annotation) is tuple:
            elements = [
                [m for info in e.__metadata__ for m in info.metadata] for e in typing.get_args(annotation)
            ]
            return [m for m in elements[0] if all(m in other for other in elements)]
        return list(metadata)

    def walk(model_cls):
        for name, field in model_cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from walk(annotation)
            elif numeric(annotation) and f"{model_cls.__name__}.{name}" not in unbounded_by_design:
                yield f"{model_cls.__name__}.{name}", constraints(annotation, field.metadata)

    checked = 0
    for key, found in walk(RunConfig):
        assert any(isinstance(m, (Ge, Gt)) for m in found), f"{key} has no lower bound"
        if key.endswith("_s"):
            highest = [m.le if isinstance(m, Le) else m.lt for m in found if isinstance(m, (Le, Lt))]
            assert highest and highest[0] <= MAX_SECONDS, f"{key} has no upper bound"
        checked += 1
    assert checked > 50


def test_with_changes_validates_what_model_copy_would_not():
    from dalle.config import with_changes

    section = RunConfig().train_clip
    assert section.model_copy(update={"max_steps": -5}).max_steps == -5  # the hole it closes
    assert with_changes(section, "the max_steps parameter", max_steps=7).max_steps == 7
    assert section.max_steps == 600  # the original is left as it was
    with pytest.raises(
        ConfigError,
        match=r"invalid value from the max_steps parameter: 'max_steps': Input should be greater than "
        r"or equal to 1 \(got -5\)",
    ):
        with_changes(section, "the max_steps parameter", max_steps=-5)
    with pytest.raises(ConfigError, match=r"'lr': Input should be a finite number \(got nan\)"):
        with_changes(section, "--lr", lr=float("nan"))
    with pytest.raises(ConfigError, match=r"'max_step': not a setting"):
        with_changes(section, "a typo", max_step=3)
    with pytest.raises(ConfigError, match="url_col and caption_col both name 'url'"):
        with_changes(RunConfig().crawl, "the demo", caption_col="url")
    whole = with_changes(RunConfig(), "a plug-in", source={"urls": "s3://bucket/urls.parquet"})
    assert whole.source.urls == "s3://bucket/urls.parquet"
