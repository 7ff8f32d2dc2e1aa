"""One source of settings: every field of MemsafeSettings reaches the operator (a parsed DAG
file), the CLI (argparse), the provider's [memsafe] config section and the docs; values are
checked with their type and range, one line per error."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from airflow_memsafe.config import (
    InvalidSettingError,
    MemsafeSettings,
    SettingSpec,
    parse_bool,
    provider_config,
    setting_specs,
)

NAMES = [f.name for f in fields(MemsafeSettings)]
# A module that imports (and registers nothing): the one field whose value must exist.
REAL_VALUES = {"types_module": "airflow_memsafe.samples"}


def _value(spec: SettingSpec) -> Any:
    """A valid value other than the default, derived from the field alone."""
    if spec.name in REAL_VALUES:
        return REAL_VALUES[spec.name]
    if spec.kind is bool:
        return not spec.default
    if spec.info.choices:
        return spec.info.choices[-1]
    if spec.kind is str:
        return spec.info.example or "/tmp/memsafe-test"
    base = spec.default if spec.default is not None else spec.info.minimum or 0
    if spec.info.example and spec.default is None:
        base = spec.kind(spec.info.example)
    value = base + 1
    if spec.info.maximum is not None and value > spec.info.maximum:
        value = spec.info.maximum
    return spec.kind(value)


def test_the_fields_are_the_specs_and_each_is_documented() -> None:
    assert [s.name for s in setting_specs()] == NAMES
    for spec in setting_specs():
        assert spec.info.description, f"{spec.name}: give it a description (SettingInfo)"
        assert spec.info.description.endswith("."), spec.name


def test_every_setting_is_an_operator_keyword_in_a_parsed_dag_file(tmp_path: Path) -> None:
    values = {spec.name: _value(spec) for spec in setting_specs()}
    tasks = "\n".join(
        f"    OsmFeatureExtractOperator(task_id='t_{name}', pbf_path='x.osm.pbf', "
        f"region_id='r', {name}={value!r})"
        for name, value in values.items()
    )
    dag_file = tmp_path / "every_setting.py"
    dag_file.write_text(
        "from datetime import datetime\n"
        "from airflow.sdk import DAG\n"
        "from airflow_memsafe import OsmFeatureExtractOperator\n"
        "with DAG('every_setting', schedule=None, start_date=datetime(2024, 1, 1)) as dag:\n"
        f"{tasks}\n"
        "    OsmFeatureExtractOperator(task_id='as_mapping', pbf_path='x.osm.pbf', "
        f"region_id='r', settings={values!r})\n"
    )
    spec = importlib.util.spec_from_file_location("every_setting", dag_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # what the DAG processor does
    dag = module.dag
    assert len(dag.tasks) == len(NAMES) + 1
    for name, value in values.items():
        task = dag.get_task(f"t_{name}")
        settings = MemsafeSettings.resolve(task.setting_overrides, lookup=lambda _n: None)
        assert getattr(settings, name) == value, name
        assert getattr(settings, name) != getattr(MemsafeSettings(), name), name
    mapped = MemsafeSettings.resolve(dag.get_task("as_mapping").setting_overrides)
    assert all(getattr(mapped, n) == v for n, v in values.items())


def test_every_setting_is_a_cli_flag() -> None:
    from airflow_memsafe import cli

    parser = cli._parser()
    for spec in setting_specs():
        value = _value(spec)
        flag = "--" + spec.name.replace("_", "-")
        argv = [f"--no-{flag[2:]}" if value is False else flag] if spec.kind is bool else []
        argv = argv or [flag, str(value)]
        args = parser.parse_args(["extract", "x.osm.pbf", *argv])
        assert getattr(cli._settings(args), spec.name) == value, spec.name


def test_every_setting_is_in_the_provider_config_section() -> None:
    from airflow_memsafe.provider import get_provider_info

    options = get_provider_info()["config"]["memsafe"]["options"]
    assert list(options) == NAMES
    types = {int: "integer", float: "float", bool: "boolean", str: "string"}
    for spec in setting_specs():
        option = options[spec.name]
        assert set(option) >= {"description", "type", "default", "example", "version_added"}
        assert option["type"] == types[spec.kind]
        assert spec.info.description in option["description"]
        # the default as Airflow's config hands it over ("" = unset) reads back as the field's
        assert spec.coerce(option["default"] or None) == spec.default
        spec.coerce(option["example"])  # a valid value


def test_airflow_reads_the_section_from_the_provider_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_memsafe.operators.extract import _airflow_conf_lookup

    monkeypatch.setenv("AIRFLOW__MEMSAFE__MAX_CLASSES", "17")
    assert MemsafeSettings.resolve(lookup=_airflow_conf_lookup).max_classes == 17
    assert MemsafeSettings.resolve(lookup=_airflow_conf_lookup).batch_size == 2000


def test_every_setting_is_in_the_docs_and_the_docs_are_generated() -> None:
    for doc in ("README.md", "docs/configuration.md"):
        text = (REPO / doc).read_text()
        for name in NAMES:
            assert f"`{name}`" in text, f"{name} missing from {doc}"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_settings_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_provider_config_is_what_get_provider_info_lists() -> None:
    from airflow_memsafe.provider import get_provider_info

    assert get_provider_info()["config"] == provider_config()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": "abc"}, "batch_size must be an integer (objects), not 'abc'"),
        ({"batch_size": 2.5}, "batch_size must be an integer (objects), not 2.5"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"batch_size": 0}, "batch_size must be >= 1, not 0"),
        ({"memory_limit_mb": 10}, "memory_limit_mb must be >= 64, not 10"),
        ({"warning_pct": "nan"}, "warning_pct must be a number (%), not 'nan'"),
        ({"hard_limit_pct": 101}, "hard_limit_pct must be > 0, <= 100, not 101"),
        ({"sample_interval_s": 0}, "sample_interval_s must be > 0, not 0"),
        ({"node_index": "dense"}, "node_index must be one of auto, flex_mem"),
        ({"force_gc": "maybe"}, "force_gc must be a boolean (true/false), not 'maybe'"),
        ({"index_dir": 5}, "index_dir must be a string, not 5"),
        ({"types_module": "a b"}, "types_module must be a dotted module name"),
        ({"warning_pct": 95}, "need warning_pct < critical_pct < hard_limit_pct"),
    ],
)
def test_wrong_values_fail_in_one_line_naming_the_setting(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSettingError) as info:
        MemsafeSettings.resolve(values, lookup=lambda _n: None)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidSettingError, match=re.escape(message)):
        MemsafeSettings(**values)  # the constructor checks alike


def test_strings_from_templates_and_config_are_parsed() -> None:
    settings = MemsafeSettings.resolve(
        {
            "batch_size": " 2000 ",
            "warning_pct": "70",
            "memory_limit_mb": "None",  # a rendered template of None: not given
            "force_gc": "off",
            "index_dir": Path("/tmp/idx"),
        },
        lookup=lambda _n: None,
    )
    assert settings.batch_size == 2000 and isinstance(settings.batch_size, int)
    assert settings.warning_pct == 70.0 and isinstance(settings.warning_pct, float)
    assert settings.memory_limit_mb is None
    assert settings.force_gc is False
    assert settings.index_dir == "/tmp/idx"
    assert MemsafeSettings(warning_pct=70).warning_pct == 70.0  # an int for a float: fine


def test_config_values_name_where_they_came_from() -> None:
    with pytest.raises(InvalidSettingError, match=r"AIRFLOW__MEMSAFE__BATCH_SIZE"):
        MemsafeSettings.resolve(lookup=lambda n: "abc" if n == "batch_size" else None)
    assert MemsafeSettings.resolve(lookup=lambda n: "" if n == "batch_size" else None) == (
        MemsafeSettings()
    )


def test_unknown_names_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown setting.*batchsize"):
        MemsafeSettings.resolve({"batchsize": 1})


def test_one_boolean_parser() -> None:
    for text in ("1", "true", "True", " yes ", "on"):
        assert parse_bool(text, "x") is True
    for text in ("0", "false", "no", "off", "", "None"):
        assert parse_bool(text, "x") is False
    assert parse_bool(None, "x") is False
    with pytest.raises(InvalidSettingError, match="reprocess must be a boolean"):
        parse_bool("sometimes", "reprocess")


# ------------------------------------------------------------------------ operator ----


def _operator(**kwargs: Any) -> Any:
    from airflow_memsafe import OsmFeatureExtractOperator

    return OsmFeatureExtractOperator(task_id="x", pbf_path="a.pbf", region_id="r", **kwargs)


def test_operator_checks_values_at_parse_time_in_one_line() -> None:
    with pytest.raises(InvalidSettingError, match="batch_size must be an integer") as info:
        _operator(batch_size="abc")
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidSettingError, match="not 2.5"):
        _operator(settings={"batch_size": 2.5})
    with pytest.raises(TypeError, match="unknown setting"):
        _operator(settings={"batchsize": 1})
    with pytest.raises(TypeError, match="Invalid arguments were passed"):
        _operator(batchsize=1)  # a misspelt keyword: Airflow's own error, as for any other


def test_operator_settings_mapping_object_and_keywords() -> None:
    op = _operator(settings=MemsafeSettings(batch_size=7, max_classes=3), max_classes=4)
    settings = MemsafeSettings.resolve(op.setting_overrides, lookup=lambda _n: None)
    assert (settings.batch_size, settings.max_classes) == (7, 4)  # keywords win
    op = _operator(settings={"batch_size": "123"})
    assert MemsafeSettings.resolve(op.setting_overrides).batch_size == 123


def test_default_args_of_the_dag_give_settings_too() -> None:
    from datetime import datetime

    from airflow.sdk import DAG

    defaults = {"batch_size": 300, "max_classes": 9}
    with DAG("d", schedule=None, start_date=datetime(2024, 1, 1), default_args=defaults):
        op = _operator(settings={"max_classes": 8})
    settings = MemsafeSettings.resolve(op.setting_overrides, lookup=lambda _n: None)
    assert (settings.batch_size, settings.max_classes) == (300, 8)  # settings= wins
    with pytest.raises(InvalidSettingError, match="batch_size must be >= 1, not 0"):
        _operator(default_args={"batch_size": 0})


def test_templated_settings_are_checked_once_rendered() -> None:
    op = _operator(batch_size="{{ params.batch }}", settings={"node_index": "{{ params.idx }}"})
    assert "setting_overrides" in op.template_fields
    rendered = op.render_template(op.setting_overrides, {"params": {"batch": 500, "idx": "auto"}})
    settings = MemsafeSettings.resolve(rendered, lookup=lambda _n: None)
    assert (settings.batch_size, settings.node_index) == (500, "auto")
    bad = op.render_template(op.setting_overrides, {"params": {"batch": "lots", "idx": "auto"}})
    with pytest.raises(InvalidSettingError, match="batch_size must be an integer"):
        MemsafeSettings.resolve(bad, lookup=lambda _n: None)


def test_the_many_regions_operator_takes_the_same_settings() -> None:
    from airflow_memsafe import OsmRegionsExtractOperator

    op = OsmRegionsExtractOperator(
        task_id="r", pbf_path="a.pbf", regions_path="g.geojson", slots_dir="/tmp/s"
    )
    assert op.setting_overrides == {"slots_dir": "/tmp/s"}
    with pytest.raises(InvalidSettingError, match="max_classes must be >= 1"):
        OsmRegionsExtractOperator(
            task_id="r2", pbf_path="a.pbf", regions_path="g.geojson", max_classes=0
        )
