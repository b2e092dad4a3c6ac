import pytest

from dalle.config import ConfigError, RunConfig, config_from_dict, dump_config, load_config


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert "127.0.0.0/8" in cfg.crawl.allow_networks
    assert cfg.source.heldout


def test_demo_config_is_step_bound_so_runs_repeat():
    assert load_config("configs/demo.yaml").clip.train.max_seconds is None


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
        config_from_dict({"source": {"heldout": ["pink circle"]}})


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
