"""Stores that misbehave (issue 14), on the loopback S3 server: a part that disappears between
listing and reading, a part whose bytes changed after its manifest, a bucket without permission,
and a store that stalls. Each ends in a clear error that names the object, exit code 2 from the
CLI without a traceback, and no manifest committed for the job that met it.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest
from typer.testing import CliRunner

from blt_data.documents import iter_documents
from blt_data.download import DownloadConfig, download
from blt_data.reader import Reader, ReaderConfig
from blt_data.registry import Registry
from blt_data.storage import IntegrityError, StoreError
from blt_data.storage import Store
from cli.blt_data import app
from tests.blt_data.test_reader import commit_patches
from tests.blt_data.test_registry import _Flaky
from tests.conftest import TEST_SECRET


def blt(*args: str, code: int) -> str:
    result = CliRunner().invoke(app, list(args))
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert "Traceback" not in out and TEST_SECRET not in out
    return out


def make_docs(store_url: str, tmp_path, n: int = 60) -> tuple[Registry, object]:
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i} " * 20}) + "\n" for i in range(n)))
    reg = Registry(Store.open(store_url))
    return reg, download(reg, DownloadConfig(source=str(src), name="docs", part_bytes=2000))


def nothing_committed(reg: Registry, name: str) -> bool:
    return reg.versions(name) == []


@pytest.fixture
def s3_docs(s3_bucket, tmp_path):
    reg, m = make_docs(f"{s3_bucket}/store", tmp_path)
    assert len(m.parts) >= 3
    return reg, m


def test_part_gone_between_listing_and_reading(s3_docs):
    reg, m = s3_docs
    gone = reg.part_path(m, m.parts[1])
    reg.store.delete(gone)
    url = reg.store.url
    for args in (["shuffle", "docs", "--name", "shuf", "--chunks", "2"],
                 ["patch", "docs", "--name", "pp", "--scheme", "space", "--dry-run"]):
        out = blt(*args, "--store", url, "-q", code=2)
        assert reg.store.uri(gone) in out, out
    assert nothing_committed(reg, "shuf")
    with pytest.raises(FileNotFoundError, match=reg.store.uri(gone)):
        list(iter_documents(reg, m))


def test_an_object_written_after_its_folder_was_listed_is_found(s3_bucket, s3_server):
    """s3fs caches listings by default, and a listing of a folder made before another process
    wrote an object there reported that object missing (the patch driver listed a job folder,
    its actors wrote the parts, the trainer in the driver's process could not open them). Our
    store keeps no listing: what another writer published is seen."""
    import boto3

    store = Store.open(f"{s3_bucket}/reg")
    store.write_bytes("job/a.json", b"1")
    assert store.list("job") == ["job/a.json"] and not store.exists("job/b.json")
    # Another process (a Ray actor, another machine): not through this filesystem instance.
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="reg/job/b.json", Body=b"2")
    assert store.exists("job/b.json") and store.size("job/b.json") == 1
    with store.open_input("job/b.json") as f:
        assert f.read() == b"2"
    assert store.list("job") == ["job/a.json", "job/b.json"]


def same_size_other_bytes(data: bytes) -> bytes:
    """The part with one document's text changed and recompressed to exactly the same size."""
    import zstandard

    plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    for i in range(len(plain)):
        if plain[i : i + 1].isalpha():
            changed = plain[:i] + plain[i : i + 1].swapcase() + plain[i + 1 :]
            for level in range(1, 20):
                other = zstandard.ZstdCompressor(level=level).compress(changed)
                if len(other) == len(data):
                    return other
    raise AssertionError("no same-size variant found")


@pytest.mark.parametrize("same_size", [True, False])
def test_part_changed_after_its_manifest(s3_docs, same_size):
    reg, m = s3_docs
    rel = reg.part_path(m, m.parts[0])
    data = reg.store.read_bytes(rel)
    reg.store.write_bytes(rel, same_size_other_bytes(data) if same_size else data + data)
    what = "sha256" if same_size else "bytes, its manifest says"
    with pytest.raises(IntegrityError, match=what) as e:
        list(iter_documents(reg, m))
    assert reg.store.uri(rel) in str(e.value)
    url = reg.store.url
    out = blt("shuffle", "docs", "--name", "shuf", "--chunks", "2", "--store", url, "-q", code=2)
    assert reg.store.uri(rel) in out and what in out
    assert nothing_committed(reg, "shuf")
    out = blt("patch", "docs", "--name", "pp", "--scheme", "space", "--dry-run", "--store", url, "-q", code=2)
    assert reg.store.uri(rel) in out


def test_trainer_reader_refuses_a_part_of_another_size(s3_bucket):
    reg = Registry(Store.open(f"{s3_bucket}/store"))
    m = commit_patches(reg)
    rel = reg.part_path(m, m.parts[1])
    reg.store.write_bytes(rel, reg.store.read_bytes(rel) + b"\0")
    cfg = ReaderConfig(dataset="pp", seq_len=64, batch_size=2, block_documents=4, epochs=1)
    with pytest.raises(StoreError, match="its manifest says") as e:
        for _ in Reader(cfg, reg):
            pass
    assert reg.store.uri(rel) in str(e.value)
    reg.store.delete(rel)
    with pytest.raises(FileNotFoundError, match=reg.store.uri(rel)):
        for _ in Reader(cfg, reg):
            pass


# --- a bucket without permission: a second moto server that enforces IAM ------------------------


@pytest.fixture(scope="module")
def iam_s3():
    """A moto server (its own process) that checks credentials and IAM policies after its first
    requests. Yields the endpoint and the keys of three users of bucket "locked": "admin" may do
    anything, "reader" may list and read, "lister" may only list."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # AWS lets s3:ListBucket do HeadBucket; moto asks for an action of that name.
    listing = ["s3:ListBucket", "s3:HeadBucket"]
    rights = {"admin": ["s3:*"], "reader": [*listing, "s3:GetObject"], "lister": listing}
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(1 + 3 * len(rights))}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="locked")
        iam = boto3.client("iam", endpoint_url=endpoint)
        keys = {}
        for user, actions in rights.items():
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": ["arn:aws:s3:::locked", "arn:aws:s3:::locked/*"]}],
            }))
        yield endpoint, keys
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def as_user(iam_s3, monkeypatch):
    from s3fs import S3FileSystem

    endpoint, keys = iam_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    def use(user: str) -> None:
        key, secret = keys.get(user, ("AKIANOTAKEY000000000", TEST_SECRET))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        S3FileSystem.clear_instance_cache()  # s3fs keeps one client per settings, not per credential

    yield use
    S3FileSystem.clear_instance_cache()


def test_bucket_without_permission(as_user, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"id": "a", "text": "x"}\n')
    store = f"s3://locked/{uuid.uuid4().hex[:8]}"
    as_user("admin")
    blt("download", str(src), "--name", "d", "--store", store, "-q", code=0)

    as_user("reader")  # may read, may not write
    assert "d@v1" in blt("registry", "list", "--store", store, code=0)
    out = blt("download", str(src), "--name", "e", "--store", store, "-q", code=2)
    assert f"{store}/datasets/e/" in out and "denied" in out.lower(), out

    as_user("lister")  # may list, may not read
    out = blt("registry", "show", "d", "--store", store, code=2)
    assert f"{store}/datasets/d/v0001/manifest.json" in out and "denied" in out.lower(), out

    as_user("nobody")  # a key the store does not know
    out = blt("download", str(src), "--name", "d", "--store", store, "-q", code=2)
    assert "s3://locked" in out and "denied" in out.lower(), out
    out = blt("registry", "list", "--store", store, code=2)
    assert "s3://locked" in out, out


# --- a store that stalls ----------------------------------------------------------------------


class _Stalling(_Flaky):
    """A loopback proxy that holds GETs of part objects without answering: the first `stalls`
    of them, or all when `stalls` is None."""

    stalls: int | None = 0
    held = 0
    # Its own counter, past the base class's throttled first requests (the base class's dict
    # is shared with the throttling test, which counts on it).
    counter = {"requests": 1000, "throttled": 0}

    def _forward(self) -> None:
        cls = type(self)
        if self.command == "GET" and "/part-" in self.path and (cls.stalls is None or cls.held < cls.stalls):
            cls.held += 1
            time.sleep(2)  # past the client's read timeout; then hang up
            self.close_connection = True
            return
        self.counter["requests"] = 1000  # stays past the base class's throttled first requests
        super()._forward()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture
def stalling_store(s3_docs, s3_server, monkeypatch):
    from s3fs import S3FileSystem

    host, port = s3_server.removeprefix("http://").split(":")
    _Stalling.upstream = (host, int(port))
    _Stalling.held = 0
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.setenv("BLT_S3_READ_TIMEOUT_S", "0.5")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    S3FileSystem.clear_instance_cache()
    try:
        yield s3_docs
    finally:
        proxy.shutdown()
        S3FileSystem.clear_instance_cache()


def test_slow_store_is_retried(stalling_store):
    reg, m = stalling_store
    _Stalling.stalls = 1
    reg = Registry(Store.open(reg.store.url))  # through the proxy
    assert len(list(iter_documents(reg, m))) == 60
    assert _Stalling.held == 1, "the proxy really stalled a read"


def test_store_that_stays_stalled_gives_a_clear_error(stalling_store):
    reg, m = stalling_store
    _Stalling.stalls = None
    out = blt("shuffle", "docs", "--name", "shuf", "--chunks", "2", "--store", reg.store.url, "-q", code=2)
    assert reg.store.uri(reg.part_path(m, m.parts[0])) in out and "timeout" in out.lower(), out
    assert _Stalling.held >= 2, "retried before giving up"
    _Stalling.stalls = 0
    assert nothing_committed(Registry(Store.open(reg.store.url)), "shuf")


def test_stalled_source_is_no_damaged_file(stalling_store):
    """A source object that times out stops the download with an error naming it; it is not
    recorded as a damaged file with a dataset committed without the rest of it."""
    reg, _ = stalling_store
    _Stalling.stalls = None
    src = f"{reg.store.url}/src/part-0.jsonl"
    _Stalling.stalls = 0
    reg.store.write_bytes("src/part-0.jsonl", b'{"id": "a", "text": "x"}\n' * 100)
    _Stalling.stalls = None
    out = blt("download", src, "--name", "fromsrc", "--store", reg.store.url, "-q", code=2)
    assert src in out and "timeout" in out.lower(), out
    _Stalling.stalls = 0
    assert nothing_committed(Registry(Store.open(reg.store.url)), "fromsrc")
