import pytest

from fedfreeze.config import SiteConfig, load_site_config, parse_config
from fedfreeze.errors import ConfigError


def test_empty_file_gives_the_documented_defaults(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("")
    cfg = load_site_config(path)
    assert cfg.train.probe_epochs == 10 and cfg.train.unfreeze == {"layer4": 0.1, "layer3": 0.3, "layer2": 0.6}
    assert cfg.train.lr == {"head": 2e-4, "layer4": 1e-4, "layer3": 5e-5, "layer2": 2e-5}
    assert cfg.train.cutmix_prob == 0.5 and cfg.model.backbone == "efficientnet_lite0"


def test_kebab_case_keys(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("[train]\nprobe-epochs = 3\ncutmix-prob = 0.25\n[cv]\nfolds = 3\n")
    cfg = load_site_config(path)
    assert (cfg.train.probe_epochs, cfg.train.cutmix_prob, cfg.cv.folds) == (3, 0.25, 3)


def test_unknown_key_is_rejected_with_its_place(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("[train]\nprobe-epoch = 3\n")
    with pytest.raises(ConfigError, match=r"site\.toml: train\.probe-epoch: unknown key"):
        load_site_config(path)


def test_bad_values_name_field_and_value():
    with pytest.raises(ConfigError, match=r"model\.dropout: .*less than 1.*\(got 1\.5\)"):
        parse_config({"model": {"dropout": 1.5}}, SiteConfig, "x")
    with pytest.raises(ConfigError, match=r"unfreeze\.layer4 should be a fraction in \[0, 1\], got 2\.0"):
        parse_config({"train": {"unfreeze": {"layer4": 2.0}}}, SiteConfig, "x")
    with pytest.raises(ConfigError, match=r"cv\.folds: .*greater than or equal to 2.*\(got 1\)"):
        parse_config({"cv": {"folds": 1}}, SiteConfig, "x")
    with pytest.raises(ConfigError, match="class-names has 3 names but num-classes is 2"):
        parse_config({"model": {"class-names": ["a", "b", "c"]}}, SiteConfig, "x")


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_site_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_config(tmp_path / "missing.toml")
