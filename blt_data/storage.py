"""Stores: every location is an fsspec URL (``s3://bucket/prefix``, ``file:///abs``, plain path).

Invariant: an object becomes visible only when complete. On a local disk we write a temporary
file beside the target and rename it; on S3 one PUT (or one multipart upload, which S3 also
publishes atomically) of the whole object. ``put_if_absent`` is the only create-only write and
is what the registry's commit protocol stands on.

S3 settings come from the standard AWS variables and files (``AWS_ENDPOINT_URL`` for MinIO and
other S3-compatible stores); nothing here ever formats credentials into a message.

Length: per-backend atomic publish and put-if-absent, retries classified for S3, and reads
checked against a manifest: one concept, the store.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import fsspec
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

log = logging.getLogger(__name__)

DEFAULT_STORE = "./blt-store"
STORE_ENV = "BLT_STORE"
READ_TIMEOUT_ENV = "BLT_S3_READ_TIMEOUT_S"


class StoreError(RuntimeError):
    """A store could not be reached or refused an operation; the message names the URL."""


class IntegrityError(StoreError):
    """An object's bytes are not the ones its manifest recorded; the message names the object."""


def _is_transient(exc: BaseException) -> bool:
    # botocore already retries 5xx/throttling per request (see s3_options); this catches what
    # escapes it: timeouts, dropped connections and the EREMOTEIO s3fs maps InternalError to.
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EREMOTEIO, errno.EAGAIN, errno.EBUSY):
        return True
    text = str(exc)
    return any(s in text for s in ("SlowDown", "Throttl", "ServiceUnavailable", "InternalError"))


def is_transport_error(exc: BaseException) -> bool:
    """An error of reaching the store (refused, timed out, cut off, denied), as opposed to one in
    the bytes it returned."""
    if _is_transient(exc) or isinstance(exc, PermissionError):
        return True
    return any(c.__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")
               for c in type(exc).__mro__)


def _named(method):
    """Errors that escape a store call name the object: PermissionError stays one, other transport
    errors (what the retries gave up on) become StoreError."""

    @functools.wraps(method)
    def wrapper(self: "Store", rel: str = "", *args, **kwargs):
        try:
            return method(self, rel, *args, **kwargs)
        except PermissionError as e:
            raise PermissionError(f"access denied to {self.uri(rel)}: {_clean(e)}") from None
        except Exception as e:
            if isinstance(e, (FileNotFoundError, FileExistsError, StoreError)) or not is_transport_error(e):
                raise
            raise StoreError(f"cannot reach {self.uri(rel)}: {type(e).__name__}: {_clean(e)}") from None

    return wrapper


transient_retry = retry(
    retry=retry_if_exception(_is_transient),
    wait=wait_random_exponential(multiplier=0.2, max=20),
    stop=stop_after_attempt(4),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


def resolve_store_url(store: str | None) -> str:
    """``--store`` wins, then ``$BLT_STORE``, then ``./blt-store``."""
    return store or os.environ.get(STORE_ENV) or DEFAULT_STORE


def s3_options(max_attempts: int = 4, connect_timeout: int = 10) -> dict[str, Any]:
    opts: dict[str, Any] = {
        # No cached listings: other processes (and this one, through other calls) write the same
        # folders, and a stale listing makes s3fs report an object written since as missing.
        "use_listings_cache": False,
        # Adaptive mode backs off on throttling and retries 5xx with jitter (botocore's own).
        "config_kwargs": {
            # AWS_MAX_ATTEMPTS, AWS's own variable, wins as it does for any AWS client.
            "retries": {"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or max_attempts), "mode": "adaptive"},
            "connect_timeout": connect_timeout,
            # Seconds without a byte before a request is retried (see filesystem_for for how
            # many times), so a store that stalls fails in bounded time.
            "read_timeout": float(os.environ.get(READ_TIMEOUT_ENV) or 30),
        },
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def filesystem_for(url: str, probe: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for a URL.

    ``probe`` gives an S3 filesystem that retries little, to tell a wrong endpoint or bucket
    at once instead of after minutes of backoff.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a"):
        opts = s3_options(max_attempts=2, connect_timeout=3) if probe else s3_options()
        fs = fsspec.filesystem("s3", **opts)
        # s3fs's own retry loop runs on top of botocore's, twice nested on a file read (around the
        # GET and around the body), so attempts multiply: 2 x 2 x 4 = 16 for a read that stalls,
        # each after READ_TIMEOUT_ENV seconds (8 minutes at the default 30 s). s3fs's loop is
        # kept for what botocore does not retry: a body cut off mid-read.
        fs.retries = 1 if probe else 2
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url)
    if protocol in ("file", "local"):
        path = os.path.abspath(path)
    return fs, path


@dataclass
class Store:
    """A root location plus the filesystem that reaches it. Paths passed in are relative to root."""

    url: str
    fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str

    @classmethod
    def open(cls, url: str | None = None) -> "Store":
        url = resolve_store_url(url)
        fs, root = filesystem_for(url)
        return cls(url=url.rstrip("/"), fs=fs, root=root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def uri(self, rel: str = "") -> str:
        """A URL for humans and for other fsspec users (never carries credentials)."""
        return f"{self.url}/{rel}" if rel else self.url

    def sub(self, rel: str) -> "Store":
        return Store(url=self.uri(rel), fs=self.fs, root=self.path(rel))

    # --- reads -----------------------------------------------------------------------------

    @_named
    @transient_retry
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    @_named
    @transient_retry
    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"not found: {self.uri(rel)}") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    @transient_retry
    def read_many(self, rels: list[str]) -> list[bytes]:
        """Several whole objects, in the order given; on S3 fetched concurrently (one round trip
        each, overlapped), which is what makes reading a thousand small objects take seconds."""
        if not rels:
            return []
        if self.is_local:
            return [self.read_bytes(rel) for rel in rels]
        paths = [self.path(rel) for rel in rels]
        found = self.fs.cat(paths, on_error="raise")
        return [found[p] for p in paths]

    @_named
    def open_input(self, rel: str, block_size: int = 8 << 20) -> IO[bytes]:
        """A seekable binary reader; large reads stream instead of loading the object.

        ``block_size`` is the read-ahead buffer on object stores: callers that keep many
        objects open at once (the shuffle's merge) pass a smaller one.
        """
        try:
            return self.fs.open(self.path(rel), "rb", block_size=block_size)
        except FileNotFoundError:
            raise FileNotFoundError(f"not found: {self.uri(rel)}") from None

    @_named
    def open_checked(self, rel: str, size: int, sha256: str, block_size: int = 8 << 20) -> IO[bytes]:
        """`open_input` for an object whose size and sha256 a manifest recorded.

        The size is checked at once (the open already asked the store for it); the sha256 when
        a sequential read reaches the end, at the cost of hashing what is read anyway. Either
        mismatch raises `IntegrityError` naming the object. A reader that stops early, or
        seeks, gets the size check only.
        """
        f = self.open_input(rel, block_size)
        found = getattr(f, "size", None)
        found = int(found) if found is not None else self.size(rel)
        if found != size:
            f.close()
            raise IntegrityError(
                f"{self.uri(rel)} is {found} bytes, its manifest says {size}: it changed after it was "
                "committed (`blt-data registry verify` checks every part)"
            )
        return _CheckedReader(f, self.uri(rel), size, sha256)

    @_named
    @transient_retry
    def list(self, rel: str = "", *, detail: bool = False) -> list:
        """Direct children of a folder (names relative to the store root); [] if absent."""
        try:
            out = self.fs.ls(self.path(rel), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        items = []
        for e in out:
            name = self._rel(e["name"])
            if name == rel.rstrip("/") or _is_temp(name):
                continue  # a folder marker listed as its own child, or an unpublished temp file
            items.append({**e, "name": name} if detail else name)
        return items

    @_named
    @transient_retry
    def find(self, rel: str = "") -> list[str]:
        try:
            return sorted(r for p in self.fs.find(self.path(rel)) if not _is_temp(r := self._rel(p)))
        except FileNotFoundError:
            return []

    @_named
    @transient_retry
    def find_detail(self, rel: str = "") -> list[tuple[str, int, float]]:
        """(path, bytes, modified as Unix seconds) of every published file below `rel`."""
        try:
            found = self.fs.find(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        out = []
        for full, info in found.items():
            name = self._rel(full)
            if _is_temp(name) or info.get("type") == "directory":
                continue
            modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            if hasattr(modified, "timestamp"):
                modified = modified.timestamp()
            out.append((name, int(info.get("size") or 0), float(modified or 0)))
        return sorted(out)

    @_named
    @transient_retry
    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def sha256(self, rel: str) -> tuple[str, int]:
        """Hash and size of an object, streamed."""
        with self.open_input(rel) as f:
            return sha256_of(f)

    # --- writes ----------------------------------------------------------------------------

    @_named
    @transient_retry
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Publish a whole object at once (overwrites)."""
        target = self.path(rel)
        if self.is_local:
            os.replace(self._local_temp(target, data), target)
        else:
            self.fs.pipe_file(target, data)

    def _local_temp(self, target: str, data: bytes | None = None) -> str:
        """A temp file beside ``target`` (same filesystem, so rename and link are atomic);
        listings skip such names."""
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        if data is not None:
            with open(tmp, "wb") as f:
                f.write(data)
        return tmp

    @contextmanager
    def create(self, rel: str, hashed: bool = True) -> Iterator["HashingWriter"]:
        """Stream an object that is published whole when the block exits without error.

        Local: a temp file in the target folder, renamed into place. S3: a local temp file,
        uploaded in one go on exit (s3fs uses one PUT or one multipart upload; either appears
        atomically). The writer hashes what passes through it, so callers get sha256 and size
        without reading the object back (``hashed=False``: only the size, for objects whose
        sha256 nobody records).
        """
        target = self.path(rel)
        if self.is_local:
            tmp = self._local_temp(target)
        else:
            fd, tmp = tempfile.mkstemp(prefix="blt-upload-")
            os.close(fd)
        raw = open(tmp, "wb")
        writer = HashingWriter(raw, hashed)
        try:
            yield writer
            raw.close()
            if self.is_local:
                os.replace(tmp, target)
            else:
                self._upload(rel, tmp)
        finally:
            raw.close()
            if os.path.exists(tmp):
                os.unlink(tmp)

    @_named
    @transient_retry
    def _upload(self, rel: str, local_path: str) -> None:
        self.fs.put_file(local_path, self.path(rel))

    @_named
    @transient_retry
    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """Create the object only if nothing is there; True if this call created it.

        Local: the whole content goes to a temp file which is hard-linked into place (link
        fails if the name exists), so the winner's object is complete when it appears.
        S3: ``If-None-Match: *`` on the PUT; the loser gets 412 → False.
        """
        target = self.path(rel)
        if self.is_local:
            tmp = self._local_temp(target, data)
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(target, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise

    @_named
    @transient_retry
    def delete(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    @transient_retry
    def delete_many(self, rels: list[str]) -> None:
        """Delete objects (absent ones are fine); on S3 in bulk requests of up to 1,000 keys."""
        if not rels:
            return
        if self.is_local:
            for rel in rels:
                try:
                    os.unlink(self.path(rel))
                except FileNotFoundError:
                    pass
            return
        try:
            self.fs.rm([self.path(rel) for rel in rels])
        except FileNotFoundError:
            pass

    def check_reachable(self) -> None:
        """Fail early, with the URL, when the store cannot be reached (wrong endpoint, no bucket)."""
        if self.is_local:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store folder {self.url}: {e.strerror or e}") from None
            return
        fs, _ = filesystem_for(self.url, probe=True)
        bucket = self.root.split("/", 1)[0]
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StoreError(f"bucket s3://{bucket} does not exist at {endpoint}") from None
        except PermissionError:
            raise StoreError(f"access denied to s3://{bucket} at {endpoint} (check AWS credentials)") from None
        except Exception as e:  # noqa: BLE001 - any transport error means unreachable
            raise StoreError(f"cannot reach store {self.url} at {endpoint}: {type(e).__name__}: {_clean(e)}") from None

    def _rel(self, full: str) -> str:
        full = full.rstrip("/")
        root = self.root.rstrip("/")
        if full == root:
            return ""
        if full.startswith(root + "/"):
            return full[len(root) + 1 :]
        return full


def sha256_of(f: IO[bytes]) -> tuple[str, int]:
    """Hash and size of what is left to read in ``f``, streamed."""
    h = hashlib.sha256()
    n = 0
    while chunk := f.read(8 << 20):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _is_temp(name: str) -> bool:
    return ".tmp-" in posixpath.basename(name)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _clean(exc: BaseException) -> str:
    """An exception's message with anything that looks like a secret removed."""
    text = str(exc)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


class HashingWriter(io.RawIOBase):
    """A write-only file that counts and sha256-hashes the bytes passing through to ``raw``."""

    def __init__(self, raw: IO[bytes], hashed: bool = True):
        self.raw = raw
        self._hash = hashlib.sha256() if hashed else None
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        if self._hash is not None:
            self._hash.update(b)
        self.nbytes += len(b)
        return self.raw.write(b)

    @property
    def sha256(self) -> str:
        if self._hash is None:
            raise ValueError("this object was written with hashed=False")
        return self._hash.hexdigest()


class _CheckedReader(io.RawIOBase):
    """Reads through to ``raw``, hashing sequential reads; at the end compares size and sha256."""

    def __init__(self, raw: IO[bytes], uri: str, size: int, sha256: str):
        self.raw, self.uri, self.size, self.sha256 = raw, uri, size, sha256
        self._hash: Any = hashlib.sha256()  # None once a seek makes the hash meaningless
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        try:
            data = self.raw.read(n)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} disappeared while it was read") from None
        except OSError as e:  # what the store's retries gave up on: name the object
            raise StoreError(f"cannot read {self.uri}: {type(e).__name__}: {_clean(e)}") from None
        if self._hash is not None:
            if data:
                self._hash.update(data)
                self.nbytes += len(data)
                if self.nbytes > self.size:
                    self._mismatch(f"holds more than the {self.size} bytes its manifest says")
            elif n != 0:
                self._at_end()
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._hash = None  # not a sequential read any more: only the size was checked
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()
        super().close()

    def _at_end(self) -> None:
        if self.nbytes != self.size:
            self._mismatch(f"ended after {self.nbytes} of the {self.size} bytes its manifest says")
        found = self._hash.hexdigest()
        if found != self.sha256:
            self._mismatch(f"has sha256 {found[:12]}…, its manifest says {self.sha256[:12]}…")
        self._hash = None  # checked; later reads at the end return b"" again without a second check

    def _mismatch(self, what: str) -> None:
        raise IntegrityError(f"{self.uri} {what}: it changed after it was committed (`blt-data registry verify` checks every part)")
