"""Fuzzing Meta's Arrow shards as `blt-data import-preprocessed` reads them (issue 14, the last
reader): odd rows (wrong entropy counts, empty or non-ASCII text, repeated ids) in shards that are
then cut, flipped or spliced.

Properties: the command ends with exit 0 or a one-line `error:` (exit 2), never a traceback; on
success every row read is a document or quarantined (documents + quarantined = rows read, all of
them when the shard is intact), and a damaged shard is reported with how far it was read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from blt_data.registry import Registry
from blt_data.storage import Store
from cli.blt_data import app
from tests.blt_data.test_fuzz_registry import mutations
from tests.blt_data.test_meta_layout import write_shard

pytestmark = pytest.mark.fuzz
# Each example runs a whole import: a quarter of the profile's budget.
few = settings(max_examples=max(8, settings.default.max_examples // 4))
SHARD = "ds/m/ds.chunk.00.jsonl.shard_00.arrow"


@st.composite
def rows(draw) -> list[dict]:
    """Rows of Meta's schema; each row's entropy count is n + 2 (right) or another count."""
    out = []
    for i in range(draw(st.integers(1, 12))):
        text = draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
        n = len(text.encode())
        count = draw(st.sampled_from([n + 2, n + 2, n + 2, n + 1, n, 0, n + 3]))
        values = draw(st.lists(st.floats(0, 8, width=16), min_size=count, max_size=count))
        sample_id = draw(st.sampled_from([str(i), str(i), "dup"]))
        out.append({"sample_id": sample_id, "text": text, "entropies": values})
    return out


def run_import(source: Path, store: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["import-preprocessed", str(source), "--name", "imp", "--threshold", "1.5",
                                      "--store", store, "-q", "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in out
    return result.exit_code, out


@few
@given(rows(), mutations(), st.booleans())
def test_any_shard_imports_or_fails_clearly(shard_rows, mutate, damage):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "pre", SHARD)
        write_shard(path, shard_rows, batch_rows=3)
        if damage:
            path.write_bytes(mutate(path.read_bytes()))
        store = str(Path(tmp, "store"))
        code, out = run_import(Path(tmp, "pre"), store)
        if code != 0:
            assert code == 2 and out.startswith("error: ") and out.count("\n") <= 2, out
            return
        m = Registry(Store.open(store)).resolve("imp")
        s = m.stats
        if not s.damaged_files:
            assert s.documents + s.quarantined == len(shard_rows)
        else:
            [report] = s.damaged_files
            assert "shard_00" in str(report) and s.documents + s.quarantined <= len(shard_rows)
        good = sum(len(r["entropies"]) == len(r["text"].encode()) + 2 for r in shard_rows)
        if not damage:
            assert s.documents == good
