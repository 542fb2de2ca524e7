"""`blt-data inspect` as users type it: the page and its URL, and clear errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blt_data.registry import Registry
from blt_data.storage import Store
from tests.blt_data.test_inspection import build_lineage, check_png, markers
from tests.cli.test_blt_data_cli import blt


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("inspect-cli")
    build_lineage(Registry(Store.open(str(root / "store"))), root)
    return str(root / "store")


def test_inspect_writes_a_page_and_prints_its_url(store, tmp_path):
    out = tmp_path / "page"
    printed = blt("inspect", "pat", "--out", str(out), "--doc", "code", "--doc", "tail", "--max-bytes", "20",
                  "--store", store)
    index = out / "index.html"
    assert str(index) in printed and index.resolve().as_uri() in printed
    page = index.read_bytes().decode()
    assert list(markers(page)) == ["code", "tail"] and "showing the first 20 of 54 bytes" in page
    check_png(out / "trace-0.png")
    check_png(out / "patch-lengths.png")

    default = blt("inspect", "nent@v1", "--out", str(tmp_path / "n"), "--docs", "2", "--store", store)
    assert "file://" in default
    page = (tmp_path / "n" / "index.html").read_bytes().decode()
    assert len(markers(page)) == 2 and "no entropies stored" in page


def test_inspect_clear_errors(store, tmp_path):
    out = str(tmp_path / "x")
    assert "error: no dataset named 'ghost'" in blt("inspect", "ghost", "--out", out, "--store", store, code=2)
    assert "error: pat@v9 does not exist" in blt("inspect", "pat@v9", "--out", out, "--store", store, code=2)
    text = blt("inspect", "docs", "--out", out, "--store", store, code=2)
    assert "error: docs@v1 is a documents dataset, not patches" in text
    text = blt("inspect", "pat", "--out", out, "--doc", "nope", "--store", store, code=2)
    assert "error: document id not found in pat@v1: 'nope'" in text
    (tmp_path / "file").write_text("not a folder")
    text = blt("inspect", "pat", "--out", str(tmp_path / "file" / "page"), "--store", store, code=2)
    assert "error: cannot write the page to" in text and "file/page" in text
    assert not Path(out).exists()
