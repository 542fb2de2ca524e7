"""Registry core: commit protocol, races, references, verification; storage guarantees."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import threading

import pyarrow as pa
import pytest
from pydantic import BaseModel

from blt_data import registry as registry_module
from blt_data.documents import DocumentWriter, encode_line, iter_documents
from blt_data.registry import Manifest, PartInfo, PartTable, Registry, RegistryError, parse_ref
from blt_data.storage import Store, StoreError
from blt_data.verify import verify


def make_dataset(reg: Registry, name: str, n: int = 20, job: str = "job1") -> Manifest:
    folder = reg.job_dir(name, job)
    with DocumentWriter(reg.store, folder, f"_jobs/{job}", target_part_bytes=200) as w:
        for i in range(n):
            w.write_line(encode_line({"id": f"d{i}", "text": f"text number {i}"}))
    m = Manifest(name=name, kind="documents", job_id=job, parts=w.parts,
                 stats={"documents": n, "bytes": sum(len(f"text number {i}") for i in range(n))})
    return reg.commit(m)


def test_commit_resolve_and_read_back(store_url):
    reg = Registry(Store.open(store_url))
    m = make_dataset(reg, "docs")
    assert m.version == 1 and len(m.parts) > 1
    assert reg.resolve("docs").ref == "docs@v1"
    assert reg.resolve("docs@v1") == reg.resolve("docs@1") == m
    assert [d["id"] for d in iter_documents(reg, m)] == [f"d{i}" for i in range(20)]
    m2 = make_dataset(reg, "docs", job="job2")
    assert m2.version == 2 and reg.resolve("docs").version == 2
    assert reg.find_job("docs", "job1").version == 1
    assert [x.ref for x in reg.list()] == ["docs@v2"]
    with pytest.raises(RegistryError, match="does not exist"):
        reg.resolve("docs@v7")
    with pytest.raises(RegistryError, match="no dataset named 'nope'"):
        reg.resolve("nope")
    with pytest.raises(RegistryError, match="expected patches"):
        reg.resolve("docs", kind="patches")


def test_manifest_is_immutable_put_if_absent(store_url):
    store = Store.open(store_url)
    assert store.put_if_absent("a/manifest.json", b"first")
    assert not store.put_if_absent("a/manifest.json", b"second")
    assert store.read_bytes("a/manifest.json") == b"first"


def test_race_two_writers_one_version(store_url):
    """Concurrent commits: each version has exactly one winner, losers take the next ones."""
    reg = Registry(Store.open(store_url))
    n = 6
    barrier = threading.Barrier(n)
    won: list[int] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait()
            won.append(reg.commit(Manifest(name="race", kind="documents", job_id=f"job{i}")).version)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(won) == list(range(1, n + 1))
    jobs = {reg.load("race", v).job_id for v in won}
    assert jobs == {f"job{i}" for i in range(n)}, "no manifest was overwritten"


def test_identical_jobs_racing_share_one_version(store_url):
    """Two runs of the same job committing at once end with one version, not two."""
    reg = Registry(Store.open(store_url))
    barrier = threading.Barrier(4)
    got: list[int] = []

    def writer() -> None:
        barrier.wait()
        got.append(reg.commit(Manifest(name="same", kind="documents", job_id="j")).version)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [1, 1, 1, 1]
    assert reg.versions("same") == [1]


def test_verify_detects_tampering_and_missing_parts(store_url):
    reg = Registry(Store.open(store_url))
    m = make_dataset(reg, "docs")
    assert verify(reg, m) == []
    first = reg.part_path(m, m.parts[0])
    data = reg.store.read_bytes(first)
    reg.store.write_bytes(first, data[:-1] + bytes([data[-1] ^ 1]))
    problems = verify(reg, m)
    assert len(problems) == 1 and "sha256" in problems[0]
    reg.store.delete(reg.part_path(m, m.parts[1]))
    assert any("missing" in p for p in verify(reg, m))


def test_refs_and_names():
    assert parse_ref("a") == ("a", None)
    assert parse_ref("a@v12") == ("a", 12)
    for bad in ("", "a@x", "../a", "a/b"):
        with pytest.raises(RegistryError):
            parse_ref(bad)


def test_create_publishes_only_complete_objects(store_url):
    store = Store.open(store_url)
    with pytest.raises(RuntimeError):
        with store.create("x/part.bin") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not store.exists("x/part.bin")
    assert store.list("x") == []
    with store.create("x/part.bin") as f:
        f.write(b"whole")
    assert store.read_bytes("x/part.bin") == b"whole"
    assert store.sha256("x/part.bin") == (f.sha256, 5)


def test_unreachable_store_and_missing_bucket_are_clear(s3_server, monkeypatch):
    with pytest.raises(StoreError, match="does not exist"):
        Store.open("s3://no-such-bucket-here/x").check_reachable()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StoreError, match="cannot reach store s3://b-b-b/x at http://127.0.0.1:9") as e:
        Store.open("s3://b-b-b/x").check_reachable()
    assert "s3cr3t" not in str(e.value)


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A loopback proxy in front of the S3 server: of its first 16 requests, every other one
    is answered 503 SlowDown (more makes botocore's adaptive rate limiter slow the test down)."""

    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue"
    upstream: tuple[str, int]
    counter = {"requests": 0, "throttled": 0}

    def _forward(self) -> None:
        self.counter["requests"] += 1
        body = self._body()
        if self.counter["requests"] % 2 == 1 and self.counter["requests"] <= 16:
            self.counter["throttled"] += 1
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        head = self.command == "HEAD"  # keeps upstream's Content-Length: the object's size
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        del self.headers["Transfer-Encoding"]
        self.headers["Content-Length"] = str(sum(map(len, chunks)))
        return b"".join(chunks)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_throttling_and_5xx_are_retried(s3_bucket, s3_server, monkeypatch):
    host, port = s3_server.removeprefix("http://").split(":")
    _Flaky.upstream = (host, int(port))
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        reg = Registry(Store.open(f"{s3_bucket}/store"))
        m = make_dataset(reg, "throttled")
        assert [d["id"] for d in iter_documents(reg, reg.resolve("throttled"))] == [f"d{i}" for i in range(20)]
        assert verify(reg, m) == []
        assert _Flaky.counter["throttled"] == 8, "the proxy really throttled the requests"
    finally:
        proxy.shutdown()


# --- manifest formats (issue 13): a part list beside a small manifest, format 1 still read ---


def test_format_1_manifest_reads_as_older_code_wrote_it(store_url):
    """A small dataset keeps its parts inline, in exactly the JSON older code writes and reads."""
    reg = Registry(Store.open(store_url))
    m = make_dataset(reg, "docs")
    stored = json.loads(reg.store.read_bytes(reg.manifest_path("docs", 1)))
    assert stored["format_version"] == 1 and "parts_file" not in stored
    assert [p["path"] for p in stored["parts"]] == [p.path for p in m.parts]
    # The manifest as an older writer left it (no key this code added) reads back whole.
    reg.store.write_bytes(reg.manifest_path("old", 1), json.dumps({**stored, "name": "old"}).encode())
    old = reg.resolve("old")
    assert old.format_version == 1 and old.parts == m.parts and old.part_count == len(m.parts)
    assert old.parts_of("train") == m.parts and len(old.part_table()) == len(m.parts)


def test_large_manifest_keeps_parts_in_a_checked_part_list(store_url, monkeypatch):
    monkeypatch.setattr(registry_module, "INLINE_PARTS", 2)
    reg = Registry(Store.open(store_url))
    m = make_dataset(reg, "docs")
    assert m.format_version == 2 and m.part_count == len(m.parts) > 2
    stored = json.loads(reg.store.read_bytes(reg.manifest_path("docs", 1)))
    assert "parts" not in stored and "quarantine" not in stored
    spec = stored["parts_file"]
    listing = f"{reg.version_dir('docs', 1)}/{spec['path']}"
    assert reg.store.sha256(listing) == (spec["sha256"], spec["bytes"]) and spec["count"] == len(m.parts)

    back = reg.resolve("docs")
    assert back == m and back.part_count == len(m.parts)
    assert back._table is None  # resolving reads no part list
    assert back.parts == m.parts and [d["id"] for d in iter_documents(reg, back)] == [f"d{i}" for i in range(20)]
    assert verify(reg, reg.resolve("docs")) == []
    # gc finds the job's parts referenced through the part list (else it would offer them).
    assert registry_module.find_garbage(reg, 0.0, 1e12) == []
    # Given new parts, a copy holds them inline until committed (existing callers do this).
    assert back.model_copy(update={"parts": back.parts[:1]}).parts == back.parts[:1]

    # A tampered part list fails verify (and any read of the list) and names the file.
    data = reg.store.read_bytes(listing)
    reg.store.write_bytes(listing, data[:-1] + bytes([data[-1] ^ 1]))
    problems = verify(reg, reg.resolve("docs"))
    assert len(problems) == 1 and "does not match its manifest" in problems[0] and spec["path"] in problems[0]
    with pytest.raises(RegistryError, match="does not match its manifest"):
        reg.resolve("docs").parts  # noqa: B018
    reg.store.delete(listing)
    assert "is missing" in verify(reg, reg.resolve("docs"))[0]


def test_part_list_pointing_outside_the_dataset_is_refused(local_store_url, monkeypatch):
    """Even with a manifest rewritten to match, a part list may not name objects elsewhere."""
    monkeypatch.setattr(registry_module, "INLINE_PARTS", 2)
    reg = Registry(Store.open(local_store_url))
    m = make_dataset(reg, "docs")
    table = m.part_table().table
    bad = table.set_column(0, "path", pa.array(["../other/x.jsonl.zst"] + table.column("path").to_pylist()[1:]))
    data = PartTable(bad).to_parquet()
    reg.store.write_bytes(f"{reg.version_dir('docs', 1)}/evil.parquet", data)
    spec = m.parts_file.model_copy(update={"path": "evil.parquet", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    evil = BaseModel.model_copy(m, update={"parts_file": spec})
    reg.store.write_bytes(reg.manifest_path("docs", 1), evil.model_dump_json().encode())
    with pytest.raises(RegistryError, match=r"row 0 has a path outside the dataset \('../other/x.jsonl.zst'\)"):
        reg.resolve("docs").parts  # noqa: B018


def test_future_manifest_format_is_refused_clearly(local_store_url):
    reg = Registry(Store.open(local_store_url))
    make_dataset(reg, "docs")
    stored = json.loads(reg.store.read_bytes(reg.manifest_path("docs", 1)))
    # A newer writer may change anything: here a new key this code's Manifest does not know.
    reg.store.write_bytes(reg.manifest_path("docs", 2), json.dumps({**stored, "format_version": 3, "shards": []}).encode())
    with pytest.raises(RegistryError, match=r"docs@v2: manifest format version 3 is newer than this blt-data .* reads \(up to 2\); upgrade blt-data"):
        reg.resolve("docs")
    assert reg.resolve("docs@v1").version == 1


def test_racing_writers_of_large_manifests_leave_one_part_list_per_version(store_url, monkeypatch):
    """Format 2 under the race: each version folder ends with its manifest and the one part
    list that manifest names (a loser removes the list it wrote into a folder it lost)."""
    monkeypatch.setattr(registry_module, "INLINE_PARTS", 2)
    reg = Registry(Store.open(store_url))
    n = 5
    barrier = threading.Barrier(n)
    won: list[Manifest] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        parts = [PartInfo(path=f"_jobs/job{i}/part-{k}", rows=k, bytes=k, sha256=f"{i:064x}") for k in range(3)]
        try:
            barrier.wait()
            won.append(reg.commit(Manifest(name="race", kind="documents", job_id=f"job{i}", parts=parts)))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(m.version for m in won) == list(range(1, n + 1))
    for m in won:
        back = reg.load("race", m.version)
        assert back.format_version == 2 and back.parts == m.parts and back.parts[0].path.startswith(f"_jobs/{m.job_id}/")
        files = sorted(p.rsplit("/", 1)[-1] for p in reg.store.list(reg.version_dir("race", m.version)))
        assert files == sorted(["manifest.json", back.parts_file.path])
