"""docs/configuration.md is generated from the pydantic models: it must never drift from them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from pydantic.fields import FieldInfo

from fedfreeze.config import TrainConfig
from fedfreeze.federation.config import FederationConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_config_docs", ROOT / "scripts" / "make_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_equals_what_the_models_generate(make_docs: ModuleType) -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == make_docs.render(), (
        "docs/configuration.md is out of date: run .venv/bin/python scripts/make_config_docs.py"
    )


def test_every_field_of_every_table_is_listed_with_its_default(make_docs: ModuleType) -> None:
    text = make_docs.render()
    for table, model, _ in make_docs.TABLES:
        section = text.split(f"## [{table}]\n", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        keys = [row.split("`")[1] for row in rows]
        assert keys == [info.alias for info in model.model_fields.values()], table
    # defaults are the models' own, written as TOML
    assert f"| `rounds` | integer, >= 1 | `{FederationConfig().rounds}` |" in text
    assert f"| `batch-size` | integer, >= 1 | `{TrainConfig().batch_size}` |" in text
    assert '| `threshold` | number or one of `"youden"`, `"youden-mid"`, `"target-sensitivity"` | `0.5` |' in text


def test_extra_descriptions_name_only_fields_without_their_own(make_docs: ModuleType) -> None:
    assert make_docs.unused_descriptions() == []


def test_a_field_without_any_description_is_refused(make_docs: ModuleType) -> None:
    with pytest.raises(ValueError, match="federation.no-such-key has no description"):
        make_docs.description_of("federation", "no-such-key", FieldInfo(annotation=int, default=1))
