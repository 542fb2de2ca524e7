"""Fuzzing what the registry and the readers read back from a store (issue 14): tampered or
truncated manifests and completion records, and damaged parts under the documents reader (shuffle,
patch) and the trainer's patches reader.

Properties: the outcome is a result or an error the CLI prints as one line (`RegistryError`,
`ReaderError`, `DocumentsError`, `IntegrityError`, ...) naming the manifest, part or object;
never another exception, never a traceback, never a dataset committed from damaged input.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from blt_data.documents import DocumentsError, iter_documents
from blt_data.download import DownloadConfig, download
from blt_data.reader import Reader, ReaderConfig, ReaderError
from blt_data.registry import Registry, RegistryError
from blt_data.storage import Store, StoreError
from blt_data.verify import verify
from cli.blt_data import app
from cli.common import EXPECTED_ERRORS
from tests.blt_data.fuzz_inputs import json_values
from tests.blt_data.test_reader import commit_patches

pytestmark = pytest.mark.fuzz
# Each example runs whole commands (shuffle, patch planning): a quarter of the profile's budget.
few = settings(max_examples=max(8, settings.default.max_examples // 4))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with a documents dataset `docs` (3 parts) and a patches dataset `pp`; copied per example."""
    root = tmp_path_factory.mktemp("template")
    src = root / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"text {i} " * 30}) + "\n" for i in range(30)))
    reg = Registry(Store.open(str(root / "store")))
    download(reg, DownloadConfig(source=str(src), name="docs", part_bytes=3000))
    commit_patches(reg)
    return root


def fresh(template: Path, tmp: str) -> Registry:
    shutil.copytree(template / "store", Path(tmp) / "store")
    return Registry(Store.open(str(Path(tmp) / "store")))


def mutations():
    """Functions bytes -> bytes: cut, flip, splice random bytes, or a JSON value put anywhere."""
    cut = st.floats(0, 1).map(lambda f: lambda b: b[: int(len(b) * f)])
    flip = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)).map(
        lambda t: lambda b: b if not b else b[: int(len(b) * t[0])] + bytes([b[int(len(b) * t[0])] ^ t[1]]) + b[int(len(b) * t[0]) + 1 :])
    splice = st.tuples(st.floats(0, 1), st.binary(max_size=30)).map(lambda t: lambda b: b[: int(len(b) * t[0])] + t[1] + b[int(len(b) * t[0]):])
    value = st.tuples(st.integers(0, 10**6), json_values | st.integers(-(2**70), 2**70) | st.just("../../../etc/passwd")).map(
        lambda t: lambda b: _replace_value(b, *t))
    deep = st.integers(100, 3000).map(lambda n: lambda b: b'{"name": ' + b"[" * n + b"]" * n + b"}")
    return st.one_of(cut, flip, splice, value, deep, st.binary(max_size=100).map(lambda r: lambda b: r))


def _replace_value(raw: bytes, seed: int, new) -> bytes:
    """The JSON document with one of its values (picked by `seed`, walking in order) replaced
    (not JSON: the value is appended)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw + json.dumps(new).encode()
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            slots.append((node, k))
            walk(v)

    walk(doc)
    if slots:
        node, k = slots[seed % len(slots)]
        node[k] = new
    return json.dumps(doc).encode()


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in out and result.exit_code in (0, 1, 2), f"exit {result.exit_code}: {out}\n{result.exception!r}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, out


@few
@given(which=st.sampled_from(["docs", "pp"]), mutate=mutations())
def test_tampered_manifest(template, which, mutate):
    with tempfile.TemporaryDirectory() as tmp:
        reg = fresh(template, tmp)
        path = reg.manifest_path(which, 1)
        reg.store.write_bytes(path, mutate(reg.store.read_bytes(path)))
        try:
            m = reg.resolve(which)
        except RegistryError as e:
            assert reg.store.uri(path) in str(e) or which in str(e)
            m = None
        for args in (["registry", "show", which], ["registry", "verify", which, "-q"], ["registry", "list"]):
            cli(*args, "--store", reg.store.url)
        if m is None:
            return
        try:  # whatever the manifest now says, reading it ends in a result or a one-line error
            if m.kind == "documents":
                sum(1 for _ in iter_documents(reg, m))
            else:
                cfg = ReaderConfig(dataset=which, seq_len=64, batch_size=2, block_documents=4, epochs=1, prefetch=0)
                sum(1 for _ in Reader(cfg, reg))
        except (*EXPECTED_ERRORS, ReaderError) as e:
            assert str(e)
        code, out = cli("shuffle", "docs", "--name", "shuf", "--chunks", "2", "--store", reg.store.url, "-q")
        if code:
            assert reg.versions("shuf") == [], "nothing committed from a dataset that failed to read"


@few
@given(part=st.integers(0, 2), mutate=mutations())
def test_damaged_documents_part_under_shuffle_and_patch(template, part, mutate):
    """A documents part changed in any way after its manifest: shuffle, patch planning and the
    documents reader refuse it naming the part, and commit nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        reg = fresh(template, tmp)
        m = reg.resolve("docs")
        rel = reg.part_path(m, m.parts[part])
        data = reg.store.read_bytes(rel)
        new = mutate(data)
        reg.store.write_bytes(rel, new)
        changed = new != data
        code, out = cli("shuffle", "docs", "--name", "shuf", "--chunks", "2", "--store", reg.store.url, "-q")
        assert (code == 2) == changed and (not changed or reg.store.uri(rel) in out), out
        assert (reg.versions("shuf") == []) == changed
        code, out = cli("patch", "docs", "--name", "pp2", "--scheme", "space", "--dry-run", "--store", reg.store.url, "-q")
        assert (code == 2) == changed and (not changed or reg.store.uri(rel) in out), out
        if changed:
            with pytest.raises((StoreError, DocumentsError), match=reg.store.uri(rel)):
                list(iter_documents(reg, m))


@given(part=st.integers(0, 2), mutate=mutations())
def test_damaged_patches_part_under_the_trainer_reader(template, part, mutate):
    with tempfile.TemporaryDirectory() as tmp:
        reg = fresh(template, tmp)
        m = reg.resolve("pp")
        rel = reg.part_path(m, m.parts[part])
        data = reg.store.read_bytes(rel)
        new = mutate(data)
        reg.store.write_bytes(rel, new)
        cfg = ReaderConfig(dataset="pp", seq_len=64, batch_size=2, block_documents=4, epochs=1, prefetch=0)
        try:
            n = sum(b["n_bytes"] for b, _ in Reader(cfg, reg))
        except (ReaderError, StoreError) as e:
            assert m.parts[part].path in str(e) or reg.store.uri(rel) in str(e), str(e)
        else:
            # Same size and a footer that still reads: only `registry verify` (sha256) can tell.
            assert len(new) == len(data)
            assert n >= 0


@few
@given(index=st.integers(0, 3), mutate=mutations())
def test_tampered_completion_record_is_redone(template, index, mutate):
    """An interrupted download whose completion record k was damaged: the rerun redoes part k
    on, and the dataset equals the one made without damage."""
    with tempfile.TemporaryDirectory() as tmp:
        reg = fresh(template, tmp)
        before = reg.resolve("docs")
        expected = [(d["id"], d["text"]) for d in iter_documents(reg, before)]
        reg.store.delete(reg.manifest_path("docs", 1))  # the job was interrupted before its commit
        shutil.rmtree(Path(reg.store.root) / "datasets/docs/v0001")
        record = f"{reg.job_dir('docs', before.job_id)}/_done/part-{index:06d}.json"
        if reg.store.exists(record):
            reg.store.write_bytes(record, mutate(reg.store.read_bytes(record)))
        src = template / "src.jsonl"
        m = download(reg, DownloadConfig(source=str(src), name="docs", part_bytes=3000))
        assert [(d["id"], d["text"]) for d in iter_documents(reg, m)] == expected
        assert m.stats.documents == before.stats.documents


def test_verify_a_part_that_ends_with_an_empty_document(tmp_path):
    """Found by fuzzing: `registry verify` of a patches part whose last document is empty raised
    IndexError (numpy's reduceat past the end of the patch lengths)."""
    reg = Registry(Store.open(str(tmp_path / "store")))
    m = commit_patches(reg, splits={"train": {"a": "some text", "b": ""}, "val": {"c": ""}}, parts=1)
    assert verify(reg, m) == []
    code, out = cli("registry", "verify", "pp", "--store", reg.store.url, "-q")
    assert code == 0, out


def test_deep_completion_record_is_redone(template, tmp_path):
    """Found by fuzzing: a completion record nested 2,000 deep raised RecursionError on resume."""
    reg = fresh(template, str(tmp_path))
    before = reg.resolve("docs")
    shutil.rmtree(Path(reg.store.root) / "datasets/docs/v0001")
    record = f"{reg.job_dir('docs', before.job_id)}/_done/part-000000.json"
    reg.store.write_bytes(record, b'{"name": ' + b"[" * 2000 + b"]" * 2000 + b"}")
    m = download(reg, DownloadConfig(source=str(template / "src.jsonl"), name="docs", part_bytes=3000))
    assert m.stats.documents == before.stats.documents
