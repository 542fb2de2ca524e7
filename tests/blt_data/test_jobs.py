from pydantic import BaseModel, Field

from blt_data.jobs import EXECUTION, output_fields
from blt_data.shuffle import ShuffleConfig
from blt_model.train import build_train_config
from pipelines.patch_job import PatchJobConfig


class Inner(BaseModel):
    size: int = 1
    threads: int = Field(2, json_schema_extra=EXECUTION)


class Outer(BaseModel):
    name: str = "x"
    inner: Inner = Field(default_factory=Inner)
    runtime: Inner = Field(default_factory=Inner, json_schema_extra=EXECUTION)
    device: str = Field("cpu", json_schema_extra=EXECUTION)


def test_execution_fields_are_left_out_at_any_depth():
    assert output_fields(Outer()) == {"name": "x", "inner": {"size": 1}}
    assert output_fields(Outer(device="cuda", inner=Inner(threads=9))) == output_fields(Outer())
    assert output_fields(Outer(), exclude={"name"}) == {"inner": {"size": 1}}
    assert Outer.model_json_schema()["properties"]["device"]["execution"] is True


def test_every_job_config_marks_how_it_runs():
    patch = PatchJobConfig(docs="d", name="p", rule={"threshold": 2.0})
    fields = output_fields(patch)
    assert not {"workers", "batch_rows", "gpus_per_worker", "cpus_per_worker", "ray_address", "retries"} & set(fields)
    assert fields["rule"]["threshold"] == 2.0 and "row_len" in fields and "unit_bytes" in fields
    train = build_train_config("debug", ["data.dataset=x"])
    moved = build_train_config("debug", ["data.dataset=x", "device=cpu", "log_every=1", "data.prefetch=0", "parallel.compile=false"])
    assert output_fields(train) == output_fields(moved)
    assert set(output_fields(ShuffleConfig())) == set(ShuffleConfig.model_fields)  # every field shapes the shuffle
