import pytest
import yaml

from lcr_fast.config import DEFAULTS, ConfigError, load_config, parse_override

from helpers import REPO

REFERENCE_CONFIGS = ["byol_cub200.yaml", "byol_stanfordcars.yaml", "byol_aircrafts.yaml"]


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_reference_configs_load_with_their_values(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.name == "byol"
    assert cfg.model.backbone.startswith("resnet50_")
    assert cfg.train.optimizer.name == "lars_simclr"
    assert cfg.train.base_lr == 0.3 and cfg.train.batch_size == 128 and cfg.train.warmup_epochs == 10
    assert cfg.train.optimizer.weight_decay == 1.5e-6
    assert cfg.train.stop_at_epoch == 100
    assert cfg.eval.base_lr == 30
    assert all(v is False for v in cfg.fixes.values()), "reference mode is the default"


def test_every_reference_key_is_known(tmp_path):
    """The reference's YAML layout, including eval: False, reads without error."""
    text = (REPO / "configs" / "byol_cub200.yaml").read_text()
    data = yaml.safe_load(text)
    data["eval"] = False
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).eval is False


def test_misspelt_key_names_key_file_and_closest_valid_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  bach_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'train.bach_size'" in message and str(path) in message and "'train.batch_size'" in message


def test_unknown_section_and_override_errors():
    with pytest.raises(ConfigError, match="did you mean 'engine'"):
        load_config(None, ["engin.zero_stage=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.batch_size"])


def test_overrides_are_parsed_as_yaml_and_win_over_the_file():
    cfg = load_config(REPO / "configs" / "byol_cub200.yaml",
                      ["train.batch_size=64", "fixes.lars_momentum=true", "model.pretrained=none"])
    assert cfg.train.batch_size == 64 and cfg.fixes.lars_momentum is True and cfg.model.pretrained == "none"
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="stop_at_epoch"):
        load_config(None, ["train.stop_at_epoch=900", "train.num_epochs=800"])
    with pytest.raises(ConfigError, match="data.backend"):
        load_config(None, ["data.backend=pil"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(None, {"train": 3})


def test_defaults_untouched_by_loading():
    before = yaml.safe_dump(DEFAULTS)
    load_config(None, ["train.batch_size=8"])
    assert yaml.safe_dump(DEFAULTS) == before


def test_eval_section_and_validation_split_are_checked():
    with pytest.raises(ConfigError, match="eval.optimizer.name must be sgd") as err:
        load_config(None, ["eval.optimizer.name=lars"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="eval.num_epochs"):
        load_config(None, ["eval.num_epochs=0"])
    with pytest.raises(ConfigError, match="data.val_per_class must be 0 .off. or at least 2"):
        load_config(None, ["data.val_per_class=1"])
    assert load_config(None, ["data.val_per_class=3", "eval=false"]).data.val_per_class == 3
