"""Hypothesis strategies for hostile input (issue 14): JSON lines whose fate is known in advance,
plus random bytes whose fate is not.

A generated line is a `Line`: its bytes and what download must make of it, "doc" (with the id
and text it must come out with), "quarantine", "blank", or "any" (random bytes: only the counts
are checked). The expected fate is stated by construction, not by running our parser.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass

import zstandard
from hypothesis import strategies as st

from blt_data.documents import MAX_JSON_DEPTH


@dataclass(frozen=True)
class Line:
    raw: bytes
    fate: str  # doc | quarantine | blank | any
    text: str | None = None  # for docs


# Text as users' corpora hold it: any Unicode scalar value (no surrogates), NUL and controls included.
texts = st.text(st.characters(codec="utf-8"), max_size=60)
safe_keys = st.text(st.characters(codec="utf-8"), max_size=8).filter(lambda k: k not in ("id", "text"))
json_scalars = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=True) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(safe_keys, inner, max_size=4),
    max_leaves=12,
)


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


@st.composite
def good_docs(draw, index: int) -> Line:
    text = draw(texts)
    doc = {"id": f"doc-{index}", "text": text, **draw(st.dictionaries(safe_keys, json_values, max_size=3))}
    items = list(doc.items())
    order = draw(st.permutations(range(len(items))))
    raw = dumps(dict(items[i] for i in order)) if draw(st.booleans()) else json.dumps(doc).encode()
    return Line(raw, "doc", text)


@st.composite
def nested(draw, index: int) -> Line:
    """A document whose meta nests `levels` deep: kept up to MAX_JSON_DEPTH levels in all."""
    levels = draw(st.integers(1, 20) | st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3) | st.integers(900, 6000))
    # Lists, objects, and lists that open with a string holding an escaped quote and a bracket.
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('["x\\"[",', "]")]))
    inner = opener * levels + "1" + closer * levels
    raw = f'{{"id": "doc-{index}", "text": "deep", "meta": {inner}}}'.encode()
    return Line(raw, "doc" if levels + 1 <= MAX_JSON_DEPTH else "quarantine", "deep")


@st.composite
def huge_numbers(draw, index: int) -> Line:
    limit = sys.get_int_max_str_digits()
    digits = draw(st.integers(1, 40) | st.integers(limit - 3, limit + 3) | st.integers(20_000, 60_000))
    number = "9" * digits
    if draw(st.booleans()):  # a float of any length is fine (it becomes inf)
        raw = f'{{"id": "doc-{index}", "text": "n", "x": {number}.5e{digits}}}'.encode()
        return Line(raw, "doc", "n")
    raw = f'{{"id": "doc-{index}", "text": "n", "x": {number}}}'.encode()
    return Line(raw, "doc" if digits <= limit else "quarantine", "n")


@st.composite
def odd_values(draw, index: int) -> Line:
    """NaN/Infinity, escaped NUL, BOM: still documents."""
    kind = draw(st.sampled_from(["nan", "inf", "nul_escaped", "bom", "crlf"]))
    if kind == "nan":
        return Line(f'{{"id": "doc-{index}", "text": "a", "m": NaN}}'.encode(), "doc", "a")
    if kind == "inf":
        return Line(f'{{"id": "doc-{index}", "text": "b", "m": [-Infinity, Infinity]}}'.encode(), "doc", "b")
    if kind == "nul_escaped":
        return Line(f'{{"id": "doc-{index}", "text": "c\\u0000d"}}'.encode(), "doc", "c\x00d")
    if kind == "bom":
        return Line(b"\xef\xbb\xbf" + f'{{"id": "doc-{index}", "text": "e"}}'.encode(), "doc", "e")
    return Line(f'{{"id": "doc-{index}", "text": "f"}}\r'.encode(), "doc", "f")


@st.composite
def bad_lines(draw, index: int) -> Line:
    kind = draw(st.sampled_from([
        "surrogate_text", "surrogate_meta", "surrogate_id", "surrogate_key", "raw_nul", "latin1", "utf16",
        "not_object", "no_text", "text_not_str", "truncated_json", "not_json",
    ]))
    i = f"doc-{index}"
    raw = {
        "surrogate_text": lambda: f'{{"id": "{i}", "text": "a\\ud800b"}}'.encode(),
        "surrogate_meta": lambda: f'{{"id": "{i}", "text": "ok", "m": ["\\udfff"]}}'.encode(),
        "surrogate_id": lambda: b'{"id": "\\udbff", "text": "ok"}',
        "surrogate_key": lambda: f'{{"id": "{i}", "text": "ok", "\\ud800": 1}}'.encode(),
        "raw_nul": lambda: f'{{"id": "{i}", "text": "a\x00b"}}'.encode(),
        "latin1": lambda: dumps({"id": i, "text": "caf\xe9 " + draw(texts)}).replace(b"\xc3\xa9", b"\xe9"),
        "utf16": lambda: json.dumps({"id": i, "text": draw(st.text("abcxyz ", max_size=20))}).encode("utf-16-le"),
        "not_object": lambda: dumps(draw(st.lists(json_scalars, max_size=3) | json_scalars)),
        "no_text": lambda: dumps({"id": i, "body": draw(texts)}),
        "text_not_str": lambda: dumps({"id": i, "text": draw(st.integers() | st.lists(texts, max_size=2) | st.none())}),
        "truncated_json": lambda: dumps({"id": i, "text": draw(texts)})[:-1],
        "not_json": lambda: b"id=" + i.encode() + b" text=" + draw(st.sampled_from([b"x", b"{", b"[[", b'"'])),
    }[kind]()
    return Line(raw, "quarantine")


blank_lines = st.sampled_from([b"", b" ", b"\t", b"\r", b"  \t \r"]).map(lambda b: Line(b, "blank"))
random_lines = st.binary(max_size=80).map(lambda b: Line(b.replace(b"\n", b" "), "any"))


@st.composite
def corpora(draw, max_lines: int = 25, random: bool = True) -> list[Line]:
    """A list of lines mixing every kind; documents get unique ids `doc-<index>`."""
    n = draw(st.integers(0, max_lines))
    out = []
    for i in range(n):
        makers = [good_docs(i), good_docs(i), nested(i), huge_numbers(i), odd_values(i), bad_lines(i), blank_lines]
        if random:
            makers.append(random_lines)
        out.append(draw(st.one_of(makers)))
    return out


def jsonl_bytes(lines: list[Line], trailing_newline: bool = True) -> bytes:
    data = b"\n".join(l.raw for l in lines)
    return data + b"\n" if trailing_newline and lines else data


def compress(data: bytes, fmt: str, frames: int = 1) -> bytes:
    """`data` as a file of format ``jsonl``, ``jsonl.zst`` or ``jsonl.gz``; compressed formats in
    `frames` concatenated frames/members (both are valid and must be read whole)."""
    if fmt == "jsonl":
        return data
    cut = [len(data) * k // frames for k in range(frames + 1)]
    pieces = [data[a:b] for a, b in zip(cut, cut[1:])]
    if fmt == "jsonl.zst":
        return b"".join(zstandard.ZstdCompressor(level=1).compress(p) for p in pieces)
    return b"".join(gzip.compress(p, mtime=0) for p in pieces)
