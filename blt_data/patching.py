"""Patch rules: a document's UTF-8 bytes (and per-byte entropies) in, patch lengths out.

A *patch* is a run of consecutive bytes that BLT's global transformer sees as one position
(BLT paper §2). The rules, exactly as DESIGN.md §4, for a document of n bytes:

- every scheme: byte 0 starts a patch; an empty document has no patches;
- ``entropy``   (paper §2.3, global threshold): byte j > 0 starts a patch when
  ``entropies[j] > threshold``, compared as real numbers (the stored float16 values are not
  rounded further and the threshold is not rounded to float16);
- ``monotonic`` (paper §2.3, approximate monotonic constraint): byte j > 0 starts a patch when
  ``entropies[j] - entropies[j-1] > threshold``, the difference taken in float64 (exact for
  float16 entropies);
- ``space``     (paper §2.2, after Slagle 2024): byte j > 0 starts a patch when byte j is a *word
  byte* and byte j-1 a *delimiter byte*, i.e. a patch starts after each run of delimiters, which
  stays at the end of the patch before it (``"a,  b"`` -> ``"a,  "``, ``"b"``). Word bytes:
  ASCII ``[0-9A-Za-z]`` and bytes >= 0xC0 (UTF-8 leading bytes of non-ASCII characters, so any
  non-ASCII character counts as a letter). Delimiter bytes: every other ASCII byte (< 0x80).
  Continuation bytes 0x80..0xBF are neither: they never start a patch, and a word byte right
  after one does not either, so a character is never split;
- ``static``    (paper §2.1): patches of ``patch_size`` bytes, the last one shorter;
- ``byte``: every byte its own patch (patch_size 1, BLT's byte-level baseline);
- then, for every scheme, ``max_patch_length`` m: a patch longer than m is cut into pieces of m
  bytes from its start, the last piece shorter. The cut counts bytes, so it may split a
  multi-byte character (the paper's code does the same).

Invariant: patch lengths are positive int32 and sum to the document's UTF-8 byte length.

Differences from the BLT paper's code (facebookresearch/blt ``bytelatent/data/patcher.py``):

1. It patches fixed-length rows of concatenated documents; patches there can span document
   boundaries and a row edge always starts one. We patch each document whole; documents never
   share a patch and a long document is never cut into rows.
2. Its entropy modes force starts at positions 0 *and* 1 (``first_ids = [0, 1]``; position 0 is
   usually BOS); monotonic mode forces position 2 as well (``mask[:, 0] = True`` on the shifted
   array). We force only byte 0, so bytes 1 and 2 follow the rule like any other byte.
3. Its entropies come from ``calculate_entropies``, which cuts the flattened batch into rows of
   ``max_length`` (8192) tokens scored without the previous row's context, so bytes at a row
   edge get context-free entropies. Ours (``blt_data/entropy.py``) keep the model's full
   context for every byte; this module only applies the rule to them.
4. It compares in float32 (``entropies.to(torch.float32)``, differences in float32). We compare
   the stored values exactly against the float64 threshold, differences in float64.
5. With no threshold it takes the top-k entropies (k = n // patch_size) per row, and it has a
   combined ``threshold_add`` mode; we offer neither. A global threshold chosen by calibration
   (``blt_data/calibrate.py``) gives a target mean patch size instead.
6. Its ``space`` mode counts UTF-8 leading bytes (>= 0xC0) as delimiters: a patch ends right
   after a leading byte and the next one starts on a continuation byte, splitting the character
   ("café au" -> "c", "af\\xc3", "\\xa9 ", "au", with its forced start at position 1). We count
   leading bytes as word bytes and never split a character.
7. Its ``space`` mode ends a patch after the *first* delimiter of a run and puts the rest of the
   run in front of the next word ("a,  b" -> "a,", "  b", forced starts aside); ours keeps the
   whole run with the patch before ("a,  ", "b"), which is what "a patch starts after each run"
   says. It also forces starts at positions 0 and 1 and after special tokens (BOS/EOS/pad);
   documents here hold no special tokens.
8. With ``include_next_token`` it patches n + 1 positions (the byte to predict next); we patch
   exactly the document's n bytes. Static mode there takes a float ``patch_size`` (default
   4.5); ours is an int >= 1.
9. Its ``entropies[:, i]`` is the entropy of the prediction made *at* token i (about token
   i + 1); our ``entropies[j]`` is indexed by the byte predicted, H(byte j | BOS, bytes < j).
   The rules agree once indexed alike; entropies taken from its code shift by one.
10. It returns right-padded [batch, max_patches] tensors (zeros after the last patch), and cuts
    at ``max_patch_length`` in a Python loop; we return ragged int32 arrays (Arrow
    list<int32>), cut vectorised. The cut rule itself is the same.

Length: the rules, their batched and Arrow forms and the incremental `PatchStream` must make
the same cuts; one module keeps them under one set of tests (DESIGN.md §4).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

Scheme = Literal["entropy", "monotonic", "space", "static", "byte"]
ENTROPY_SCHEMES = ("entropy", "monotonic")

# Documents are patched in groups of about this many bytes, and monotonic differences (float64)
# taken in chunks of this many bytes, so temporaries stay cache- and allocator-friendly.
_GROUP_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20
_FLOAT16_INF = np.uint16(0x7C00)  # bit pattern of +inf; above it (sign bit clear) only NaN

# Byte classes for `space`: 0 continuation byte (0x80..0xBF), 1 word byte, 2 delimiter byte.
_CONTINUATION, _WORD, _DELIMITER = 0, 1, 2
_BYTE_CLASS = np.full(256, _DELIMITER, dtype=np.uint8)
_BYTE_CLASS[0x80:0xC0] = _CONTINUATION
_BYTE_CLASS[0xC0:] = _WORD
for _lo, _hi in ((b"0", b"9"), (b"A", b"Z"), (b"a", b"z")):
    _BYTE_CLASS[_lo[0] : _hi[0] + 1] = _WORD


class PatchRule(BaseModel):
    """How documents are cut into patches (DESIGN.md §4): the one config of the rule, nested in
    every job that patches (``patch``, ``repatch``).

    An entropy scheme takes its threshold either directly or as a target mean patch size that
    calibration turns into one (``blt_data.calibrate.calibrated``); applying the rule needs the
    threshold.
    """

    model_config = ConfigDict(extra="forbid")

    scheme: Scheme = Field("entropy", description="patch rule, see the module docstring")
    threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="nats; entropy/monotonic only, required to apply them (e.g. from calibration)",
    )
    target_patch_size: float | None = Field(
        None, gt=0, description="bytes per patch; entropy/monotonic only: calibrate the threshold on a sample"
    )
    calibration_bytes: int = Field(10**6, ge=1024, le=1 << 30, description="sample size (UTF-8 bytes) for target_patch_size")
    calibration_seed: int = Field(0, ge=0, description="seed of the calibration sample's draw of documents (target_patch_size only)")
    max_patch_length: int | None = Field(None, ge=1, description="cut longer patches into pieces of this many bytes")
    patch_size: int = Field(4, ge=1, description="bytes per patch for `static`")

    @model_validator(mode="after")
    def _threshold_only_for_entropy(self) -> "PatchRule":
        if self.scheme not in ENTROPY_SCHEMES:
            for name in ("threshold", "target_patch_size"):
                if getattr(self, name) is not None:
                    raise ValueError(f"scheme {self.scheme!r} takes no {name}: it is only used by the entropy schemes")
        elif self.threshold is not None and self.target_patch_size is not None:
            raise ValueError(f"scheme {self.scheme!r} takes a threshold or a target_patch_size, not both")
        return self

    @model_serializer(mode="wrap")
    def _seed_only_with_target(self, handler):
        # The seed decides output only through calibration: a rule with a threshold dumps (and so
        # hashes into job ids) as it did before the seed existed.
        data = handler(self)
        if self.target_patch_size is None:
            data.pop("calibration_seed", None)
        return data

    def require_threshold_or_target(self, options: str = "threshold and target_patch_size") -> None:
        """For a job that has nowhere else to take the threshold from: an entropy scheme needs
        one of the two (``options`` names them as the caller's user sets them)."""
        if self.scheme in ENTROPY_SCHEMES and self.threshold is None and self.target_patch_size is None:
            raise ValueError(f"scheme {self.scheme!r} needs exactly one of {options}")

    def with_threshold(self, threshold: float) -> "PatchRule":
        """The rule as applied once calibration chose its threshold."""
        return self.model_copy(update={"threshold": threshold, "target_patch_size": None})

    def params(self) -> dict:
        """The rule as a manifest records it (``patch_size`` only where it is used)."""
        return {
            "scheme": self.scheme,
            "threshold": self.threshold,
            "target_patch_size": self.target_patch_size,
            "max_patch_length": self.max_patch_length,
            "patch_size": self.patch_size if self.scheme == "static" else None,
        }


class PatchedBatch(NamedTuple):
    """Patches of many documents: ``patch_lengths[offsets[i]:offsets[i+1]]`` are document i's,
    with ``offsets = [0, *cumsum(num_patches)]``."""

    patch_lengths: np.ndarray  # int32, every document's patch lengths end to end (bytes)
    num_patches: np.ndarray  # int64, patches per document (0 for an empty document)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.num_patches)]).astype(np.int64)

    def split(self) -> list[np.ndarray]:
        """One array of patch lengths per document."""
        return np.split(self.patch_lengths, self.offsets()[1:-1])


def patch_lengths(
    text: str | bytes | memoryview, entropies: np.ndarray | None, cfg: PatchRule
) -> np.ndarray:
    """Patch lengths (int32, bytes) of one document; ``entropies`` (one per UTF-8 byte, nats) are
    needed by the entropy schemes only."""
    utf8 = text.encode("utf-8") if isinstance(text, str) else text
    lengths = np.array([len(utf8)], dtype=np.int64)
    batch = patch_lengths_batch(lengths, entropies, cfg, utf8=utf8 if cfg.scheme == "space" else None)
    return batch.patch_lengths


def patch_lengths_batch(
    byte_lengths: np.ndarray | Sequence[int],
    entropies: np.ndarray | None,
    cfg: PatchRule,
    utf8: np.ndarray | bytes | None = None,
) -> PatchedBatch:
    """Patch many documents at once, laid end to end (the layout of an Arrow list/string column).

    byte_lengths: UTF-8 byte length of each document, shape (D,).
    entropies: entropy schemes only: all documents' per-byte entropies concatenated, shape
        (sum(byte_lengths),), any float dtype (float16 as stored).
    utf8: ``space`` only: all documents' UTF-8 bytes concatenated (bytes or a uint8 array).

    The cost is a few vectorised passes over the bytes, with no per-document Python work.
    """
    byte_lengths = np.asarray(byte_lengths, dtype=np.int64).reshape(-1)
    if byte_lengths.size and byte_lengths.min() < 0:
        raise ValueError("byte_lengths must be >= 0")
    offsets = np.zeros(byte_lengths.size + 1, dtype=np.int64)
    np.cumsum(byte_lengths, out=offsets[1:])
    total = int(offsets[-1])

    if cfg.scheme == "byte":
        return PatchedBatch(np.ones(total, dtype=np.int32), byte_lengths.copy())
    if cfg.scheme == "static":
        # One patch per non-empty document, cut at patch_size: the same cut as max_patch_length.
        nonempty = byte_lengths > 0
        lengths, num = _cut(byte_lengths[nonempty], nonempty.astype(np.int64), cfg.patch_size)
        if cfg.max_patch_length is not None:
            lengths, num = _cut(lengths, num, cfg.max_patch_length)
        return PatchedBatch(lengths.astype(np.int32), num)

    if cfg.scheme == "space":
        signal = _as_bytes(utf8, total)
    else:
        if cfg.threshold is None:
            raise ValueError(f"scheme {cfg.scheme!r} needs a threshold (set it, or calibrate one)")
        signal = _as_entropies(entropies, total, cfg.scheme)
    # Groups of whole documents of about _GROUP_BYTES: every temporary stays small enough to be
    # reused from the allocator instead of freshly mapped (page faults cost more than the work).
    group_starts = np.searchsorted(offsets[:-1], np.arange(_GROUP_BYTES, total, _GROUP_BYTES))
    bounds = np.unique(np.r_[0, group_starts, byte_lengths.size])
    parts, nums = [], []
    for d0, d1 in zip(bounds[:-1], bounds[1:]):
        group_offsets = offsets[d0 : d1 + 1] - offsets[d0]
        group_signal = signal[offsets[d0] : offsets[d1]]
        if cfg.scheme == "space":
            starts = _space_starts(group_signal)
        elif cfg.scheme == "entropy":
            starts = above(group_signal, cfg.threshold)
        else:
            starts = _monotonic_starts(group_signal, cfg.threshold)
        group = patches_from_starts(starts, group_offsets, byte_lengths[d0:d1], cfg.max_patch_length)
        parts.append(group.patch_lengths)
        nums.append(group.num_patches)
    if len(parts) == 1:
        return PatchedBatch(parts[0], nums[0])
    return PatchedBatch(np.concatenate(parts), np.concatenate(nums))


def patch_lengths_arrow(
    text: pa.Array | pa.ChunkedArray, entropies: pa.Array | pa.ChunkedArray | None, cfg: PatchRule
) -> pa.ListArray:
    """The ``patch_lengths`` column (list<int32>) for a ``text`` column (string/large_string)
    and, for the entropy schemes, an ``entropies`` column (list<float16> or any float list)."""
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise TypeError(f"text must be a string column, not {text.type}")
    if text.null_count:
        raise ValueError("text column has nulls")
    offset_type = np.int64 if pa.types.is_large_string(text.type) else np.int32
    text_offsets = np.frombuffer(text.buffers()[1], dtype=offset_type)
    text_offsets = text_offsets[text.offset : text.offset + len(text) + 1].astype(np.int64)  # a slice starts inside
    byte_lengths = np.diff(text_offsets)

    utf8 = None
    if cfg.scheme == "space":
        data = text.buffers()[2]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        utf8 = data[text_offsets[0] : text_offsets[-1]]

    values = None
    if cfg.scheme in ENTROPY_SCHEMES:
        if entropies is None:
            raise ValueError(f"scheme {cfg.scheme!r} needs the entropies column")
        if isinstance(entropies, pa.ChunkedArray):
            entropies = entropies.combine_chunks()
        if len(entropies) != len(text) or entropies.null_count:
            raise ValueError("entropies column must have one non-null list per document")
        entropy_lengths = entropies.value_lengths().to_numpy().astype(np.int64)
        bad = np.flatnonzero(entropy_lengths != byte_lengths)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"row {i}: {entropy_lengths[i]} entropies for {byte_lengths[i]} bytes ({bad.size} such rows)")
        values = entropies.flatten().to_numpy(zero_copy_only=False)

    batch = patch_lengths_batch(byte_lengths, values, cfg, utf8=utf8)
    offsets = pa.array(batch.offsets().astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(batch.patch_lengths, type=pa.int32()))


def start_scores(
    entropies: np.ndarray, byte_lengths: np.ndarray | Sequence[int], scheme: Literal["entropy", "monotonic"]
) -> np.ndarray:
    """The value compared with the threshold at every byte that can start a patch (all but each
    document's byte 0), in document order: a byte starts a patch iff its score > threshold.
    Entropies keep their dtype; monotonic differences are float64. Used by calibration."""
    byte_lengths = np.asarray(byte_lengths, dtype=np.int64).reshape(-1)
    total = int(byte_lengths.sum())
    e = _as_entropies(entropies, total, scheme)
    first = np.zeros(total, dtype=bool)
    first[(np.cumsum(byte_lengths) - byte_lengths)[byte_lengths > 0]] = True
    if scheme == "entropy":
        return e[~first]
    diffs = np.diff(e.astype(np.float64))  # diffs[j-1] = e[j] - e[j-1]
    return diffs[~first[1:]]


def _as_bytes(utf8: np.ndarray | bytes | None, total: int) -> np.ndarray:
    if utf8 is None:
        raise ValueError("scheme 'space' needs the documents' UTF-8 bytes")
    b = np.frombuffer(utf8, dtype=np.uint8) if isinstance(utf8, (bytes, bytearray, memoryview)) else np.asarray(utf8)
    if b.dtype != np.uint8 or b.ndim != 1 or b.size != total:
        raise ValueError(f"utf8 must be {total} bytes (uint8, 1-D), got shape {b.shape} dtype {b.dtype}")
    return b


def _as_entropies(entropies: np.ndarray | None, total: int, scheme: str) -> np.ndarray:
    if entropies is None:
        raise ValueError(f"scheme {scheme!r} needs entropies")
    e = np.asarray(entropies)
    if e.ndim != 1 or e.size != total:
        raise ValueError(f"scheme {scheme!r} needs one entropy per UTF-8 byte: {total} bytes, got entropies of shape {e.shape}")
    if not np.issubdtype(e.dtype, np.floating):
        e = e.astype(np.float64)
    # NaN compares false and would silently glue patches together; it means a broken model.
    if any(nan_mask(e[i : i + _CHUNK_BYTES]).any() for i in range(0, e.size, _CHUNK_BYTES)):  # pieces stay in cache
        nan = np.isnan(e)
        raise ValueError(f"entropies contain NaN at byte {int(np.flatnonzero(nan)[0])}")
    return e


def round_down(threshold: float, dtype: np.dtype) -> np.generic:
    """The largest value t of ``dtype`` with t <= threshold: then x > t iff x > threshold for
    every x of that dtype, so comparing in the entropies' own dtype is exact and cheap (and a
    threshold written for a reader that compares in ``dtype`` gives our decisions)."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, then its largest value
        t = np.asarray(threshold, dtype=dtype)[()]
    if float(t) > threshold:
        t = np.nextafter(t, dtype.type(-np.inf))
    return t


def nan_mask(values: np.ndarray) -> np.ndarray:
    """``np.isnan(values)``; for float16 by bit pattern (exponent all ones, mantissa not zero),
    several times faster than numpy's float16 isnan."""
    if values.dtype == np.float16:
        return (values.view(np.uint16) & np.uint16(0x7FFF)) > _FLOAT16_INF
    return np.isnan(values)


def above(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values > threshold`` as real numbers, for values of any float dtype (the threshold is
    rounded down to that dtype, which keeps every decision). Float16 values with no sign bit set
    and no NaN (entropies) are compared as int16 bit patterns, which order as their values do:
    the same result, ~10x cheaper than numpy's float16 comparison."""
    t = round_down(threshold, values.dtype) + values.dtype.type(0)  # -0.0 -> +0.0: 0 > t stays false
    if values.dtype == np.float16 and values.view(np.uint16).max(initial=0) <= _FLOAT16_INF:
        return values.view(np.int16) > t.view(np.int16)
    return values > t


def _monotonic_starts(e: np.ndarray, threshold: float) -> np.ndarray:
    starts = np.empty(e.size, dtype=bool)
    if e.size:
        starts[0] = True
    for lo in range(1, e.size, _CHUNK_BYTES):
        hi = min(lo + _CHUNK_BYTES, e.size)
        seg = e[lo - 1 : hi].astype(np.float64)
        np.greater(seg[1:] - seg[:-1], threshold, out=starts[lo:hi])
    return starts


def _space_starts(b: np.ndarray) -> np.ndarray:
    cls = _BYTE_CLASS[b]
    starts = np.empty(b.size, dtype=bool)
    if b.size:
        starts[0] = True
        np.logical_and(cls[1:] == _WORD, cls[:-1] == _DELIMITER, out=starts[1:])
    return starts


def patches_from_starts(
    starts: np.ndarray, offsets: np.ndarray, byte_lengths: np.ndarray, max_patch_length: int | None = None
) -> PatchedBatch:
    """The patches of documents laid end to end, from a start mask over their positions (one
    bool per position, ``offsets = [0, *cumsum(byte_lengths)]``): every non-empty document's
    position 0 is forced (``starts`` is changed in place), then patches longer than
    ``max_patch_length`` are cut from their start. The last step of every rule here, and of
    Meta's rule replayed over its tokens (``blt_data.meta_layout``)."""
    lengths, num = _lengths_from_starts(starts, offsets, np.asarray(byte_lengths, dtype=np.int64))
    if max_patch_length is not None:
        lengths, num = _cut(lengths, num, max_patch_length)
    return PatchedBatch(lengths.astype(np.int32), num)


def _lengths_from_starts(
    starts: np.ndarray, offsets: np.ndarray, byte_lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Patch lengths and patches per document from a start mask over the concatenated bytes;
    forces each non-empty document's byte 0 (which also ends the previous document's patch)."""
    if byte_lengths.size == 1:  # one document: skip the per-document bookkeeping
        if starts.size:
            starts[0] = True
    else:
        starts[offsets[:-1][byte_lengths > 0]] = True
    positions = np.flatnonzero(starts)
    lengths = np.empty(positions.size, dtype=np.int64)
    np.subtract(positions[1:], positions[:-1], out=lengths[:-1])
    if positions.size:
        lengths[-1] = offsets[-1] - positions[-1]
    if byte_lengths.size == 1:
        return lengths, np.array([positions.size], dtype=np.int64)
    return lengths, np.diff(np.searchsorted(positions, offsets))


def _cut(lengths: np.ndarray, num: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every patch longer than m into pieces of m from its start (last piece shorter)."""
    if lengths.size == 0 or lengths.max() <= m:
        return lengths, num
    pieces = (lengths + (m - 1)) // m
    piece_end = np.cumsum(pieces)
    out = np.full(int(piece_end[-1]), m, dtype=np.int64)
    out[piece_end - 1] = lengths - (pieces - 1) * m
    if num.size == 1:
        return out, np.array([out.size], dtype=np.int64)
    # Pieces per document: cumulative piece counts at each document's patch boundaries.
    cum = np.zeros(piece_end.size + 1, dtype=np.int64)
    cum[1:] = piece_end
    bounds = np.zeros(num.size + 1, dtype=np.int64)
    np.cumsum(num, out=bounds[1:])
    return out, np.diff(cum[bounds])


WORD_BYTES = _BYTE_CLASS == _WORD  # (256,) bool: the `space` rule's word bytes


class PatchStream:
    """The patch rule applied one byte at a time, for generation: after `push`ing bytes
    0..n-1, `lengths` equals ``patch_lengths(bytes, entropies, cfg)`` of those bytes, and
    `starts_patch` says whether byte n would start a patch, before it is known where that
    depends only on its entropy (tested against `patch_lengths` on every prefix).

    Entropies are compared exactly as the patch job compares them: rounded to float16 (the
    stored value), against the float64 threshold; monotonic differences in float64.
    """

    def __init__(self, cfg: PatchRule):
        if cfg.scheme in ENTROPY_SCHEMES and cfg.threshold is None:
            raise ValueError(f"scheme {cfg.scheme!r} needs a threshold (set it, or calibrate one)")
        self.cfg = cfg
        self.lengths: list[int] = []  # patch lengths of the bytes pushed so far
        self.num_bytes = 0
        self._rule_start = 0  # the last byte the rule itself (before max_patch_length) started
        self._prev_entropy: float | None = None
        self._prev_byte: int | None = None

    def _rule_starts(self, entropy: float | None, byte: int | None) -> bool:
        n, cfg = self.num_bytes, self.cfg
        if n == 0 or cfg.scheme == "byte":
            return True
        if cfg.scheme == "static":
            return n % cfg.patch_size == 0
        if cfg.scheme == "space":
            if byte is None:
                raise ValueError("the space rule needs the byte")
            return bool(_BYTE_CLASS[self._prev_byte] == _DELIMITER and _BYTE_CLASS[byte] == _WORD)
        if entropy is None:
            raise ValueError(f"scheme {cfg.scheme!r} needs the byte's entropy")
        e = float(np.float16(entropy))
        if cfg.scheme == "entropy":
            return e > cfg.threshold
        return e - self._prev_entropy > cfg.threshold

    def starts_patch(self, entropy: float | None = None, byte: int | None = None) -> bool:
        """Whether byte `num_bytes` starts a patch; entropy: its entropy (entropy schemes),
        byte: its value (`space` only)."""
        if self._rule_starts(entropy, byte):
            return True
        m = self.cfg.max_patch_length
        return m is not None and (self.num_bytes - self._rule_start) % m == 0

    def push(self, byte: int, entropy: float | None = None) -> bool:
        """Append byte `num_bytes`; returns whether it started a patch."""
        rule = self._rule_starts(entropy, byte)
        m = self.cfg.max_patch_length
        start = rule or (m is not None and (self.num_bytes - self._rule_start) % m == 0)
        if rule:
            self._rule_start = self.num_bytes
        if start:
            self.lengths.append(1)
        else:
            self.lengths[-1] += 1
        self.num_bytes += 1
        self._prev_byte = byte
        self._prev_entropy = float(np.float16(entropy)) if entropy is not None else None
        return start
