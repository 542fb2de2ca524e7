"""Fuzzing configs (issue 14): any YAML file and any `key=value` overrides give a validated config
or a `ConfigError` (which the CLIs print as one line), never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from blt_model.configs import ConfigError, build_config
from blt_model.train import TrainConfig
from tests.blt_data.fuzz_inputs import json_values

pytestmark = pytest.mark.fuzz

FIELDS = sorted(TrainConfig.model_fields)
DATA_FIELDS = [f"data.{k}" for k in ("dataset", "seq_len", "batch_size", "seed", "epochs")]
keys = st.sampled_from(FIELDS + DATA_FIELDS + ["data", "model.dim", "nope", "data.nope", "", ".", "a..b", "data."])
yaml_docs = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=6).map(yaml.safe_dump),
    st.builds(lambda d: "data: {dataset: pp, seq_len: " + str(d) + "}\n", st.integers() | st.floats() | st.text(max_size=5)),
    # Nesting (past the recursion limit in test_deep_yaml_is_a_config_error only: PyYAML takes seconds to get there).
    st.integers(1, 60).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 60).map(lambda n: "seed: " + "[" * n),
    st.just("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    ) + "seed: *i\n"),  # a billion laughs: shared references, 9^9 leaves if walked
    st.text(max_size=200),
)
overrides = st.lists(
    st.builds(lambda k, sep, v: f"{k}{sep}{v}", keys, st.sampled_from(["=", "", "=="]),
              st.one_of(st.text(max_size=20), st.integers().map(str), st.just("[" * 50), st.just("{a: 1}"), st.just("1e309"))),
    max_size=4,
)


@given(doc=st.one_of(yaml_docs.map(str.encode), st.binary(max_size=200)), extra=overrides)
@example(doc=b"\xff\xfe\x00s\x00e\x00e\x00d\x00", extra=[])
def test_any_config_file_and_overrides(doc, extra):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(doc)
        try:
            cfg = build_config(TrainConfig, path, extra)
        except ConfigError as e:
            assert str(e)
        else:
            assert isinstance(cfg, TrainConfig)


def test_deep_yaml_is_a_config_error(tmp_path):
    """Found by fuzzing: PyYAML recursed through a 5,000-deep file (RecursionError, a traceback)."""
    path = tmp_path / "deep.yaml"
    path.write_text("seed: " + "[" * 5000)
    with pytest.raises(ConfigError, match="deep.yaml nests too deep"):
        build_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="seed: the value nests too deep"):
        build_config(TrainConfig, None, ["seed=" + "[" * 5000])


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="latin1.yaml is not UTF-8"):
        build_config(TrainConfig, path)
