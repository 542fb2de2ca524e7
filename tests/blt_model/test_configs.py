import pytest

from blt_model.configs import ConfigError, build_config
from pipelines.patch_job import FaultInjection, PatchJobConfig

BASE = ["docs=d", "name=p", "rule.threshold=2"]


def test_dotted_override_into_an_optional_nested_config():
    cfg = build_config(PatchJobConfig, None, [*BASE, "fault.unit=3", "fault.kind=raise"])
    assert cfg.fault == FaultInjection(unit=3, kind="raise")
    assert cfg.rule.threshold == 2.0


def test_dotted_override_errors_name_the_key():
    with pytest.raises(ConfigError, match="workers.count: workers is not a section"):
        build_config(PatchJobConfig, None, [*BASE, "workers.count=3"])
    with pytest.raises(ConfigError, match="unknown config key 'fault.units'"):
        build_config(PatchJobConfig, None, [*BASE, "fault.units=3"])
    with pytest.raises(ConfigError, match="unknown config key 'rule.treshold'"):
        build_config(PatchJobConfig, None, [*BASE, "rule.treshold=3"])
