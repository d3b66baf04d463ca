import pytest

from fedfreeze.errors import ConfigError
from fedfreeze.federation.config import from_run_config, load_fed_config, site_sections, unflatten


def test_run_config_names_a_shipped_config_and_overrides_dotted_keys():
    cfg = from_run_config(
        {"config": "fed-demo.toml", "federation.rounds": 4, "out-dir": "/x", "sites-dir": "/s", "resume": False}
    )
    assert cfg.federation.rounds == 4
    assert cfg.federation.out_dir == "/x"
    assert cfg.model.input_size == 160  # from the shipped fed-demo.toml


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"federation\.roundz: unknown key"):
        from_run_config({"federation.roundz": 4})


def test_bad_values_are_named(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text("[federation]\nrounds = 2\nprobe-rounds = 3\n")
    with pytest.raises(ConfigError, match=r"probe-rounds \(3\) cannot exceed rounds \(2\)"):
        load_fed_config(path)
    path.write_text('[federation]\nstrategy = "krum"\n')
    with pytest.raises(ConfigError, match=r"federation\.strategy: .*'fedavg'"):
        load_fed_config(path)


def test_site_payload_round_trip():
    cfg = load_fed_config(None, {"model.input-size": 96, "train.batch-size": 8})
    model, train = site_sections(cfg.site_payload())
    assert model.input_size == 96 and train.batch_size == 8


def test_unflatten_nested_keys():
    assert unflatten({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
