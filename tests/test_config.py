import pytest

from medusa_toolkit.config import ConfigError, ToolkitConfig, config_from_dict, load_config


def test_defaults_and_overrides():
    cfg = config_from_dict({"heads": {"num_heads": 3}}, ["heads.head_type=shared_lm_head", "train.learning_rate=0.01"])
    assert isinstance(cfg, ToolkitConfig)
    assert cfg.heads.num_heads == 3 and cfg.heads.head_type == "shared_lm_head"
    assert cfg.train.learning_rate == 0.01 and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.name_or_path == "smollm2-135m-instruct"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'heads.num_head'.*Did you mean 'heads.num_heads'"):
        config_from_dict({"heads": {"num_head": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*Did you mean 'train'"):
        config_from_dict({"trian": {}})


def test_bad_values_name_the_key_and_the_allowed_values():
    with pytest.raises(
        ConfigError,
        match=r"'heads.head_type'.*allowed values: 'per_head_lm_head', 'shared_lm_head'.*did you mean 'shared_lm_head'",
    ):
        config_from_dict({}, ["heads.head_type=shared_head"])
    with pytest.raises(ConfigError, match=r"'heads.num_heads': expected int"):
        config_from_dict({"heads": {"num_heads": "four"}})
    with pytest.raises(ConfigError, match=r"'heads.num_heads': must be >= 1"):
        config_from_dict({"heads": {"num_heads": 0}})
    with pytest.raises(ConfigError, match=r"'model.dtype'"):
        config_from_dict({"model": {"dtype": "fp32"}})
    with pytest.raises(ConfigError, match="section.key=value"):
        config_from_dict({}, ["heads.num_heads"])


def test_load_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: some/model\nheads:\n  num_heads: 2\n")
    cfg = load_config(path, ["heads.num_layers=2"])
    assert cfg.model.name_or_path == "some/model" and cfg.heads.num_heads == 2 and cfg.heads.num_layers == 2
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("heads: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config key 'heads': expected a mapping"):
        load_config(tmp_path / "bad.yaml")


def test_embedded_default_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "smollm2-135m.yaml")
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert set(cfg.stages) <= {"data", "train", "tree", "verify", "export"}


def test_yaml_round_trip():
    import yaml

    cfg = config_from_dict({"heads": {"num_heads": 5}})
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_readme_documents_every_config_key():
    """The README's config reference must stay true: every schema key appears there as `section.key`."""
    from pathlib import Path

    from medusa_toolkit.config import config_keys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "train.deepspeed.zero_stage" in config_keys() and len(config_keys()) > 80
    missing = [k for k in config_keys() if f"`{k}`" not in readme]
    assert not missing, f"README.md's config reference lacks: {missing}"


def test_every_shipped_config_is_valid():
    from pathlib import Path

    root = Path(__file__).parents[1]
    configs = sorted((root / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(path)
        if cfg.train.deepspeed.config_file:
            assert (root / cfg.train.deepspeed.config_file).is_file(), path
