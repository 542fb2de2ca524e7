"""Registry core: commit protocol, races, references, verification; storage guarantees."""

from __future__ import annotations

import http.client
import http.server
import threading

import pytest

from blt_data.documents import DocumentWriter, encode_line, iter_documents
from blt_data.registry import Manifest, Registry, RegistryError, parse_ref
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
