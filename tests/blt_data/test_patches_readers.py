"""The patches Parquet parts, as they are, in the readers people use (DESIGN.md §4): pyarrow.dataset,
datasets.load_dataset("parquet"), DuckDB and Polars, from a local disk and from the loopback S3
server, with the documented column types and patch lengths that sum to each text's UTF-8 length."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from blt_data.registry import Registry
from blt_data.storage import Store
from tests.blt_data.test_meta_layout import commit_dataset, make_docs

DOCS = make_docs(60, seed=7)
EXPECTED_ARROW = {
    "id": pa.string(), "text": pa.large_string(), "patch_lengths": pa.list_(pa.int32()),
    "entropies": pa.list_(pa.float16()), "eos_entropy": pa.float16(),
}


@pytest.fixture
def parts(store_url):
    """(URLs of the dataset's parts, S3 endpoint or None)."""
    reg = Registry(Store.open(store_url))
    m = commit_dataset(reg, "corpus", DOCS, max_len=12)
    paths = [reg.store.path(reg.part_path(m, p)) for p in m.parts]
    if reg.store.is_local:
        return paths, None
    return [f"s3://{p}" for p in paths], os.environ["AWS_ENDPOINT_URL"]


def check_rows(ids, texts, patch_lengths, entropies, eos):
    by_id = {d[0]: d for d in DOCS}
    assert sorted(ids) == sorted(by_id)
    for i, t, pl, e, x in zip(ids, texts, patch_lengths, entropies, eos):
        _, text, ent, eos_entropy = by_id[i]
        assert t == text and sum(pl or []) == len(text.encode()) and all(p >= 1 for p in pl or [])
        assert np.array_equal(np.asarray(e or [], np.float16), ent) and np.float16(x) == np.float16(eos_entropy)


def test_pyarrow_dataset(parts):
    import pyarrow.dataset as pds

    files, endpoint = parts
    fs = None
    if endpoint:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        files = [f.removeprefix("s3://") for f in files]
    table = pds.dataset(files, format="parquet", filesystem=fs).to_table()
    assert {f.name: f.type for f in table.schema} == EXPECTED_ARROW
    check_rows(*(table.column(c).to_pylist() for c in EXPECTED_ARROW))


def test_datasets_load_dataset(parts, tmp_path):
    import datasets

    files, endpoint = parts
    options = {"endpoint_url": endpoint} if endpoint else None
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"), storage_options=options)
    assert ds.features["patch_lengths"] == datasets.List(datasets.Value("int32"))
    assert ds.features["entropies"] == datasets.List(datasets.Value("float16"))
    assert ds.features["eos_entropy"] == datasets.Value("float16") and ds.features["text"] == datasets.Value("large_string")
    check_rows(*(ds[c] for c in EXPECTED_ARROW))


def test_duckdb_read_parquet(parts):
    import duckdb

    files, endpoint = parts
    con = duckdb.connect()
    if endpoint:  # through fsspec (s3fs), as DuckDB's Python API allows: no httpfs download needed
        import s3fs

        con.register_filesystem(s3fs.S3FileSystem(endpoint_url=endpoint))
    listed = ", ".join(f"'{f}'" for f in files)
    con.execute(f"create view patches as select * from read_parquet([{listed}])")
    types = dict((name, kind) for name, kind, *_ in con.execute("describe patches").fetchall())
    # DuckDB has no half float: float16 columns read as FLOAT (float32), lists stay lists.
    assert types == {"id": "VARCHAR", "text": "VARCHAR", "patch_lengths": "INTEGER[]", "entropies": "FLOAT[]", "eos_entropy": "FLOAT"}
    bad = con.execute("""
        select count(*) from patches
        where coalesce(list_sum(patch_lengths), 0) != strlen(text) or len(entropies) != strlen(text)
    """).fetchall()[0][0]
    assert bad == 0 and con.execute("select count(*) from patches").fetchall()[0][0] == len(DOCS)
    rows = con.execute("select id, text, patch_lengths, entropies, eos_entropy from patches").fetchall()
    check_rows(*zip(*rows))


def test_polars_scan_parquet(parts):
    import polars as pl

    files, endpoint = parts
    options = None
    if endpoint:
        options = {"aws_endpoint_url": endpoint, "aws_allow_http": "true", "aws_region": "us-east-1",
                   "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    lf = pl.scan_parquet(files, storage_options=options)
    assert dict(lf.collect_schema()) == {"id": pl.String, "text": pl.String, "patch_lengths": pl.List(pl.Int32),
                                         "entropies": pl.List(pl.Float16), "eos_entropy": pl.Float16}
    sums = lf.select((pl.col("patch_lengths").list.sum() == pl.col("text").str.len_bytes()).all()).collect().item()
    assert sums
    df = lf.collect()
    check_rows(*(df[c].to_list() for c in EXPECTED_ARROW))
