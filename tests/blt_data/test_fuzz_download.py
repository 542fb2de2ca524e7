"""Fuzzing ``blt-data download`` (issue 14): hostile JSONL, .jsonl.zst, .jsonl.gz, .parquet and .txt.

Properties, for any generated input: the job finishes (no exception, and through the CLI no
traceback and exit code 0); every valid document comes out once, with its text; every bad line
is quarantined with its source, line and reason; lines in = documents + quarantined + blank; a
damaged file is reported with how far it was read, and what was read before the damage is kept.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from blt_data.documents import iter_documents, iter_lines, json_depth, parse_json_line
from blt_data.download import DownloadConfig, download
from blt_data.registry import Registry
from blt_data.storage import Store
from cli.blt_data import app
from tests.blt_data.fuzz_inputs import Line, compress, corpora, json_values, jsonl_bytes, texts

pytestmark = pytest.mark.fuzz


def run_download(folder: Path, files: dict[str, bytes], **cfg):
    src = folder / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    reg = Registry(Store.open(str(folder / "store")))
    m = download(reg, DownloadConfig(source=str(src), name="fuzz", **cfg))
    docs = list(iter_documents(reg, m))
    quarantine = [json.loads(l) for p in m.quarantine for l in iter_lines(reg.store, reg.part_path(m, p))]
    return m, docs, quarantine


def check_outcome(lines: list[Line], name: str, m, docs: list[dict], quarantine: list[dict], first_line: int = 1):
    """The exact fate of every line of one file whose lines are `lines` (numbered from `first_line`)."""
    expected_docs = [(f"doc-{i}", l.text) for i, l in enumerate(lines) if l.fate == "doc"]
    got = [(d["id"], d["text"]) for d in docs if d["id"].startswith("doc-")]
    assert [g for g in got if g[0] in dict(expected_docs)] == expected_docs
    bad = {first_line + i for i, l in enumerate(lines) if l.fate == "quarantine"}
    q_lines = {q["line"] for q in quarantine if q["source"] == name}
    assert bad <= q_lines, f"lines {sorted(bad - q_lines)} should be quarantined"
    for q in quarantine:
        assert q["source"] and q["reason"] and q["line"] >= 1
    blank = sum(l.fate == "blank" for l in lines)
    assert m.stats.blank_lines >= blank
    # Counts in = documents out + quarantined + blank.
    assert m.stats.documents + m.stats.quarantined + m.stats.blank_lines == len(lines)
    assert m.stats.documents == len(docs) and m.stats.quarantined == len(quarantine)
    if all(l.fate != "any" for l in lines):
        assert len(docs) == len(expected_docs) and q_lines == bad and m.stats.blank_lines == blank


@given(lines=corpora(), fmt=st.sampled_from(["jsonl", "jsonl.zst", "jsonl.gz"]), frames=st.integers(1, 3),
       trailing_newline=st.booleans())
def test_any_lines_any_line_format(lines, fmt, frames, trailing_newline):
    data = compress(jsonl_bytes(lines, trailing_newline), fmt, frames)
    if lines and not trailing_newline and not lines[-1].raw:
        lines = lines[:-1]  # an empty last line without its newline is no line at all
    with tempfile.TemporaryDirectory() as tmp:
        m, docs, quarantine = run_download(Path(tmp), {f"in.{fmt}": data}, part_bytes=4096)
    check_outcome(lines, f"in.{fmt}", m, docs, quarantine)
    assert not m.stats.damaged_files


@given(lines=corpora(max_lines=15, random=False), fmt=st.sampled_from(["jsonl.zst", "jsonl.gz"]),
       cut=st.floats(0, 1, exclude_max=True), garbage=st.binary(max_size=20))
def test_file_that_ends_mid_frame_keeps_what_was_read(lines, fmt, cut, garbage):
    """A compressed file cut anywhere, perhaps followed by junk: reported with how far it was read,
    and every line read is accounted for. Cut cleanly, the lines before the cut come out exactly
    as from the whole file (junk after a cut may decode into junk lines, which are quarantined)."""
    whole = compress(jsonl_bytes(lines), fmt)
    data = whole[: int(len(whole) * cut)] + garbage
    with tempfile.TemporaryDirectory() as tmp:
        m, docs, quarantine = run_download(Path(tmp), {f"in.{fmt}": data})
    damaged = m.stats.damaged_files
    if not damaged:  # junk that happens to decode whole (an empty gzip member, say) is no damage
        assert garbage or not data, "a cut file is always reported (an empty one is an empty file)"
        return
    (d,) = damaged
    assert d["file"] == f"in.{fmt}" and d["error"]
    read = d["lines_read"]
    incomplete = [q for q in quarantine if q["reason"].startswith("incomplete")]
    assert all(q["line"] == read + 1 for q in incomplete)
    s = m.stats
    assert s.documents + s.quarantined + s.blank_lines == read + len(incomplete)
    texts = {f"doc-{i}": l.text for i, l in enumerate(lines) if l.fate == "doc"}
    assert all(texts.get(doc["id"], doc["text"]) == doc["text"] for doc in docs), "a document never comes out altered"
    if garbage:
        return
    assert read <= len(lines)
    check_outcome(lines[:read], f"in.{fmt}", m.model_copy(update={"stats": s.model_copy(update={
        "quarantined": s.quarantined - len(incomplete)})}), docs, [q for q in quarantine if q not in incomplete])


@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "jsonl.zst", "jsonl.gz", "parquet", "txt"]),
       magic=st.sampled_from([b"", b"\x28\xb5\x2f\xfd", b"\x1f\x8b\x08", b"PAR1", b"\xef\xbb\xbf"]))
def test_random_bytes_in_every_format(data, fmt, magic):
    """Random bytes (some behind the right magic number, or the wrong one) under every supported
    extension: the job finishes, and counts add up or the file is reported damaged."""
    raw = magic + data
    with tempfile.TemporaryDirectory() as tmp:
        m, docs, quarantine = run_download(Path(tmp), {f"x.{fmt}": raw, "ok.jsonl": b'{"id": "ok", "text": "kept"}\n'})
    assert ("ok", "kept") in [(d["id"], d["text"]) for d in docs], "a bad file never costs the good ones"
    s = m.stats
    if fmt == "txt":
        assert s.documents + s.quarantined == 2
    for d in s.damaged_files:
        assert d["file"] == f"x.{fmt}" and d["error"] and d["lines_read"] >= 0


parquet_values = st.one_of(
    texts, st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.binary(max_size=10),
    st.lists(st.integers(0, 9), max_size=3),
)


@given(rows=st.lists(st.fixed_dictionaries({"text": parquet_values}, optional={"id": parquet_values, "meta": parquet_values}), max_size=20),
       row_group=st.integers(1, 8))
def test_parquet_of_any_column_types(rows, row_group):
    """Parquet whose text column is of any type, with nulls and odd pass-through columns."""
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return  # columns of mixed types are not Parquet at all
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group)
    with tempfile.TemporaryDirectory() as tmp:
        m, docs, quarantine = run_download(Path(tmp), {"t.parquet": buf.getvalue()})
    good = [r["text"] for r in table.to_pylist() if isinstance(r.get("text"), str)]
    assert [d["text"] for d in docs] == good
    assert m.stats.documents + m.stats.quarantined == len(rows)
    assert all(q["source"] == "t.parquet" and q["reason"] for q in quarantine)
    assert sorted(q["line"] for q in quarantine) == [i + 1 for i, r in enumerate(table.to_pylist()) if not isinstance(r.get("text"), str)]


@settings(max_examples=10)
@given(lines=corpora(max_lines=12))
def test_cli_prints_no_traceback(lines):
    """Through the CLI as a user runs it: exit code 0 and a summary, never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_bytes(jsonl_bytes(lines))
        result = CliRunner().invoke(app, ["download", str(src), "--name", "f", "--store", f"{tmp}/store", "-q"])
    out = result.output
    assert result.exit_code == 0, out + repr(result.exception)
    assert "Traceback" not in out
    bad = sum(l.fate == "quarantine" for l in lines)
    if bad:
        assert "lines quarantined" in out


# --- regression tests: the minimal examples fuzzing found ---------------------------------------


def test_deep_nesting_is_quarantined_not_a_crash(tmp_path):
    """Issue 14: a line nested 5,000 deep stopped the whole download with RecursionError."""
    deep = b'{"id": "deep", "text": "ok", "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    m, docs, quarantine = run_download(tmp_path, {"d.jsonl": b'{"id": "a", "text": "x"}\n' + deep + b'\n{"id": "b", "text": "y"}\n'})
    assert [d["id"] for d in docs] == ["a", "b"], "the documents after the deep line are read"
    (q,) = quarantine
    assert q["line"] == 2 and q["source"] == "d.jsonl" and "nested deeper" in q["reason"]


def test_integer_past_the_digit_limit_is_quarantined(tmp_path):
    """Found by fuzzing: a 4,301-digit integer raised a bare ValueError that ended the download."""
    m, docs, quarantine = run_download(tmp_path, {"n.jsonl": b'{"id": "n", "text": "t", "x": ' + b"9" * 4301 + b'}\n{"id": "b", "text": "y"}\n'})
    assert [d["id"] for d in docs] == ["b"]
    assert quarantine[0]["line"] == 1 and "number" in quarantine[0]["reason"]


@pytest.mark.parametrize("line", [
    b'{"id": "s", "text": "ok", "m": "\\udfff"}',  # lone surrogate outside the text field
    b'{"id": "\\udbff", "text": "ok"}',  # in the id
    b'{"id": "s", "text": "ok", "\\ud800": 1}',  # in a key
])
def test_lone_surrogate_outside_text_is_quarantined(tmp_path, line):
    """Found by fuzzing: json reads "\\udfff" into a str that UTF-8 cannot encode, and writing the
    document raised UnicodeEncodeError, ending the download."""
    m, docs, quarantine = run_download(tmp_path, {"s.jsonl": line + b'\n{"id": "b", "text": "y"}\n'})
    assert [d["id"] for d in docs] == ["b"]
    assert quarantine[0]["line"] == 1 and "UnicodeEncodeError" in quarantine[0]["reason"]
    assert m.stats.duplicate_ids == 0


def test_utf16_line_is_quarantined_not_decoded(tmp_path):
    """json.loads(bytes) guesses UTF-16 from NUL bytes; a JSONL line is UTF-8 or quarantined."""
    line = json.dumps({"id": "u", "text": "abc"}).encode("utf-16-le")
    m, docs, quarantine = run_download(tmp_path, {"u.jsonl": line + b"\n"})
    assert not docs and quarantine[0]["line"] == 1


# --- the nesting walk against a plain recursive reference ------------------------------------


def reference_depth(value) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return 0
    return 1 + max((reference_depth(v) for v in value), default=0)


@given(json_values, st.integers(0, 300))
def test_json_depth_matches_a_recursive_walk(value, extra):
    wrapped = value
    for i in range(extra):
        wrapped = [wrapped] if i % 2 else {"k": wrapped}
    assert json_depth(wrapped) == reference_depth(wrapped)


def test_parse_json_line_bounds():
    assert parse_json_line(b'{"a": ' + b"[" * 255 + b"]" * 255 + b"}")["a"] is not None
    with pytest.raises(ValueError, match="257 levels"):
        parse_json_line(b'{"a": ' + b"[" * 256 + b"]" * 256 + b"}")


def test_blank_lines_alone_are_counted(tmp_path):
    """Found by fuzzing: a file of blank lines only wrote no completion record, so its blank
    lines were never counted (counts in != counts out)."""
    m, docs, quarantine = run_download(tmp_path, {"b.jsonl": b"\n \n\t\n"})
    assert (m.stats.documents, m.stats.quarantined, m.stats.blank_lines) == (0, 0, 3)
