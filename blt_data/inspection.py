"""``blt-data inspect``: a static HTML page that shows what a patches dataset holds.

The page is one folder, readable offline and by any browser (no network resources, no JS)::

    index.html          documents, colour legend, statistics, lineage (``blt_data.lineage``), the manifest
    trace-<k>.png       entropy (nats) against byte index of document k, the threshold, patch starts
    patch-lengths.png   the dataset-wide patch-length histogram from the manifest's statistics

Each document is drawn as in the BLT paper's patching figures (paper §2): every patch is a box
whose thick left edge is its start, and every character is shaded by the entropy of its first
UTF-8 byte, H(byte j | BOS, bytes < j), from white (0 nats) to red. A character is never split:
it is drawn in the patch that holds its first byte. A patch that starts on a continuation byte
(the entropy rules, ``static``, ``byte`` and ``max_patch_length`` cuts count bytes, not
characters) gets a dashed box right after that character, so the page always has exactly one
box (``data-patch``) per patch shown.

Invariant: every byte of text reaches the page HTML-escaped, and ``index.html`` is written last
(temp file + rename), so a page that exists has its PNGs beside it.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from blt_data.calibrate import Calibration
from blt_data.lineage import lineage
from blt_data.patches import check_patches, has_entropies
from blt_data.patching import ENTROPY_SCHEMES
from blt_data.registry import Manifest, Registry
from blt_data.stats import HISTOGRAM_MAX_LENGTH

HIGH_RGB = (214, 39, 40)  # the red at the top of the scale (matplotlib's tab:red)
# Control characters are invisible (or, for NUL and CR, rewritten by the HTML parser): they are
# drawn as a grey ``\xNN`` escape instead (Unicode's control pictures need fonts few machines
# have); newline and tab keep their layout and get a visible mark from CSS.
_CONTROLS = frozenset(range(0x20)) - {0x09, 0x0A} | {0x7F}
class InspectError(ValueError):
    """The page cannot be made: not a patches dataset, an unknown document id, an unwritable folder."""


@dataclass
class Document:
    id: str
    text: str
    patch_lengths: np.ndarray  # int64, bytes per patch
    entropies: np.ndarray | None  # float32 nats, one per byte; None when the dataset stores none
    part: str
    row: int


def write_inspect_page(
    registry: Registry,
    ref: str,
    out_dir: str | os.PathLike,
    doc_ids: list[str] | None = None,
    n_docs: int = 3,
    max_bytes: int = 2000,
) -> Path:
    """Write the page of patches dataset ``ref`` into ``out_dir``; returns the path of index.html.

    Shows the documents ``doc_ids`` (in that order), or else the first ``n_docs`` in manifest
    order, each cut to its first ``max_bytes`` bytes (at a character boundary).
    """
    if n_docs < 1 or max_bytes < 1:
        raise InspectError("n_docs and max_bytes must be at least 1")
    manifest = registry.resolve(ref)
    try:
        check_patches(manifest)
    except ValueError as e:
        raise InspectError(f"{e}; inspect shows patches datasets (make one with blt-data patch)") from None
    documents = find_documents(registry, manifest, doc_ids, n_docs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        page = _render(registry, manifest, documents, out, max_bytes)
        tmp = out / "index.html.tmp"
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out / "index.html")
    except OSError as e:
        raise InspectError(f"cannot write the page to {out}: {e.strerror or e}") from None
    return out / "index.html"


def find_documents(registry: Registry, manifest: Manifest, doc_ids: list[str] | None, n_docs: int) -> list[Document]:
    """The documents ``doc_ids`` (an unknown id is an error that names it), or the first ``n_docs``."""
    wanted = list(dict.fromkeys(doc_ids)) if doc_ids else None
    columns = ["id", "text", "patch_lengths"] + (["entropies"] if has_entropies(manifest) else [])
    found: list[Document] = []

    def done() -> bool:
        return len(found) >= (n_docs if wanted is None else len(wanted))

    table = manifest.part_table().select()
    for index in range(len(table)):
        if done():
            break
        part = table.info(index)  # one at a time: the first documents need the first parts only
        with registry.store.open_input(registry.part_path(manifest, part)) as f:
            parquet = pq.ParquetFile(f)
            first_row = 0
            for group in range(parquet.num_row_groups):
                if done():
                    break
                num_rows = parquet.metadata.row_group(group).num_rows
                if wanted is None:
                    take = np.arange(min(num_rows, n_docs - len(found)))
                else:  # the id column first: only a row group that holds a wanted id is read whole
                    ids = parquet.read_row_group(group, columns=["id"]).column("id")
                    take = np.flatnonzero(pc.is_in(ids, value_set=pa.array(wanted, pa.string())).to_numpy(zero_copy_only=False))
                if take.size:
                    table = parquet.read_row_group(group, columns=columns).take(take)
                    found += [_document(table, j, part.path, first_row + int(i)) for j, i in enumerate(take)]
                first_row += num_rows
    if wanted is None:
        return found
    by_id = {d.id: d for d in found}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise InspectError(f"document id{'s' if len(missing) > 1 else ''} not found in {manifest.ref}: "
                           + ", ".join(repr(i) for i in missing))
    return [by_id[i] for i in wanted]


def _document(table: pa.Table, j: int, part: str, row: int) -> Document:
    """Row j of a patches table; list columns go to numpy without Python floats in between."""
    def values(column: str) -> np.ndarray:
        return table.column(column)[j].values.to_numpy(zero_copy_only=False)

    entropies = values("entropies").astype(np.float32) if "entropies" in table.column_names else None
    return Document(id=table.column("id")[j].as_py(), text=table.column("text")[j].as_py(),
                    patch_lengths=values("patch_lengths").astype(np.int64), entropies=entropies, part=part, row=row)


def color_of(entropy: float, vmax: float) -> str:
    """White (0 nats) to red (``vmax`` nats and above), as a CSS hex colour."""
    t = min(max(entropy / vmax, 0.0), 1.0)
    return "#" + "".join(f"{round(255 + (c - 255) * t):02x}" for c in HIGH_RGB)


def patch_starts(patch_lengths: np.ndarray) -> np.ndarray:
    """Byte offset of each patch's first byte."""
    return np.concatenate([[0], np.cumsum(patch_lengths)[:-1]]).astype(np.int64) if patch_lengths.size else np.zeros(0, np.int64)


def cut_at_character(utf8: bytes, max_bytes: int) -> int:
    """The largest character boundary <= max_bytes (the whole text when it fits)."""
    if len(utf8) <= max_bytes:
        return len(utf8)
    cut = max_bytes
    while cut > 0 and (utf8[cut] & 0xC0) == 0x80:  # byte `cut` continues a character: step back
        cut -= 1
    return cut


def render_text(doc: Document, cut: int, vmax: float | None) -> tuple[str, int]:
    """HTML of the document's first ``cut`` bytes (a character boundary): one box per patch,
    one span per character; returns it and the number of patches shown."""
    shown = doc.text.encode("utf-8")[:cut].decode("utf-8")
    starts = patch_starts(doc.patch_lengths)
    ends = starts + doc.patch_lengths
    num_shown = int(np.searchsorted(starts, cut))
    out: list[str] = []
    k = 0  # next patch to open
    pos = 0  # byte offset of the current character

    def open_patch(mid: bool) -> None:
        nonlocal k
        if k:
            out.append("</span>")
        a, b = int(starts[k]), int(ends[k])
        title = f"patch {k} · bytes {a}–{b - 1} ({b - a} byte{'s' if b - a > 1 else ''})"
        if mid:
            title += " · starts inside the character before"
        cls = "patch mid" if mid else "patch"
        out.append(f'<span class="{cls}" data-patch="{k}" title="{html.escape(title)}">')
        k += 1

    for ch in shown:
        width = len(ch.encode("utf-8"))
        if k < num_shown and starts[k] == pos:
            open_patch(mid=False)
        code = ord(ch)
        cls = "c nl" if ch == "\n" else "c tab" if ch == "\t" else "c"
        title = f"byte {pos}" if width == 1 else f"bytes {pos}–{pos + width - 1}"
        style = ""
        if doc.entropies is not None and vmax is not None and pos < doc.entropies.size:
            e = float(doc.entropies[pos])
            title += f" · H = {e:.3f} nats" + (" (first byte)" if width > 1 else "")
            style = f' style="background:{color_of(e, vmax)}"'
        glyph = f'<span class="ctl">\\x{code:02x}</span>' if code in _CONTROLS else html.escape(ch)
        out.append(f'<span class="{cls}"{style} title="{html.escape(title)}">{glyph}</span>')
        pos += width
        while k < num_shown and starts[k] < pos:  # patches that start on a continuation byte
            open_patch(mid=True)
    if k:
        out.append("</span>")
    assert k == num_shown, (k, num_shown)
    return "".join(out), num_shown


def _figure(width: float, height: float):
    # The object-oriented API with an explicit Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_trace(path: Path, doc: Document, cut: int, scheme: str, threshold: float | None) -> None:
    """Entropy against byte index over the bytes shown, the threshold, and patch starts as ticks."""
    from matplotlib.ticker import MaxNLocator

    e = doc.entropies[:cut]
    x = np.arange(cut)
    starts = patch_starts(doc.patch_lengths)
    starts = starts[starts < cut]
    monotonic = scheme == "monotonic" and threshold is not None
    fig = _figure(11, 3.6 if monotonic else 2.6)
    axes = fig.subplots(2, 1, sharex=True) if monotonic else [fig.subplots()]
    ax = axes[0]
    ax.step(x, e, where="mid", color="tab:red", linewidth=0.9, label="entropy")
    if scheme == "entropy" and threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=0.9, label=f"threshold θ = {threshold:.4g}")
    ax.set_ylabel("entropy (nats)")
    if monotonic:  # the monotonic rule thresholds the rise H(j) - H(j-1), not H(j) itself
        rise = np.diff(e.astype(np.float64), prepend=np.nan)
        axes[1].step(x, rise, where="mid", color="tab:purple", linewidth=0.9, label="H(j) − H(j−1)")
        axes[1].axhline(threshold, color="black", linestyle="--", linewidth=0.9, label=f"threshold θ = {threshold:.4g}")
        axes[1].set_ylabel("rise (nats)")
    for a in axes:
        a.vlines(starts, 0, 0.08, transform=a.get_xaxis_transform(), color="tab:blue", linewidth=0.8, label="patch start")
        a.set_xlim(-0.5, max(cut, 1) - 0.5)
        a.legend(loc="lower right", bbox_to_anchor=(1, 1), fontsize=7, ncols=3, frameon=False, borderaxespad=0.2)
        a.tick_params(labelsize=8)
    axes[-1].set_xlabel("byte index")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, format="png")


def write_histogram(path: Path, histogram: list[int], mean: float | None) -> None:
    """Bars for patch lengths 1..64 bytes and one for longer patches (the manifest's fixed bins)."""
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(histogram)
    used = np.flatnonzero(counts)
    top = max(int(used[-1]) + 1 if used.size else 1, 16)  # bars up to the longest patch seen
    fig = _figure(9, 3)
    ax = fig.subplots()
    ax.bar(np.arange(1, top + 1), counts[:top], width=0.85, color="tab:blue")
    ax.set_xlim(0.3, top + 0.7)
    if top > HISTOGRAM_MAX_LENGTH:  # the last bin counts every longer patch
        ticks = [1, 8, 16, 24, 32, 40, 48, 56, HISTOGRAM_MAX_LENGTH + 1]
        ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + [f">{HISTOGRAM_MAX_LENGTH}"])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("patch length (bytes)")
    ax.set_ylabel("patches")
    title = f"{sum(histogram):,} patches"
    if mean:
        ax.axvline(mean, color="black", linestyle="--", linewidth=0.9)
        title += f", mean {mean:.2f} bytes (dashed)"
    ax.set_title(title, fontsize=10)
    fig.savefig(path, format="png")


def _render_lineage(node: dict) -> str:
    kind = f' <span class="kind">{html.escape(node["kind"])}</span>' if node["kind"] else ""
    details = f' <span class="params">{html.escape(" · ".join(node["details"]))}</span>' if node["details"] else ""
    note = f' <span class="note">({html.escape(node["note"])})</span>' if node["note"] else ""
    children = "".join(_render_lineage(p) for p in node["parents"])
    sub = f"<ul>{children}</ul>" if children else ""
    return f'<li><code class="ref">{html.escape(node["ref"])}</code>{kind}{details}{note}{sub}</li>'


def _scale_max(manifest: Manifest, documents: list[Document], threshold: float | None) -> float:
    """Top of the colour scale (nats): the dataset's 99th percentile entropy, so one page's
    documents share one scale; at least the threshold, so it falls on the scale."""
    q = manifest.stats.entropy_quantiles or {}
    vmax = q.get("q99")
    if vmax is None:
        vmax = max((float(d.entropies.max()) for d in documents if d.entropies is not None and d.entropies.size), default=1.0)
    if threshold is not None:
        vmax = max(vmax, threshold)
    return max(vmax, 1e-3)


def _render(registry: Registry, manifest: Manifest, documents: list[Document], out: Path, max_bytes: int) -> str:
    p, s = manifest.params, manifest.stats
    scheme = p.get("scheme")
    threshold = p.get("threshold") if scheme in ENTROPY_SCHEMES else None
    with_entropies = has_entropies(manifest)
    vmax = _scale_max(manifest, documents, threshold) if with_entropies else None
    esc = html.escape

    summary = [f"{s.documents:,} documents", f"{s.bytes:,} bytes", f"{s.patches or 0:,} patches"]
    if s.mean_patch_length:
        summary.append(f"mean patch length {s.mean_patch_length:.2f} bytes")
    rule = f"scheme {scheme}" if scheme else "scheme unknown"
    if threshold is not None:
        rule += f", threshold θ = {threshold:.4g} nats" + (" (on the rise H(j) − H(j−1))" if scheme == "monotonic" else "")
    if p.get("max_patch_length"):
        rule += f", max patch length {p['max_patch_length']} bytes"
    summary.append(rule)
    if p.get("calibration"):
        calibration = Calibration.model_validate(p["calibration"])
        summary.append(calibration.describe() + (f" (warning: {w})" if (w := calibration.warning()) else ""))
    model = p.get("model")
    if isinstance(model, dict) and "ref" in model:
        summary.append(f"entropy model {model['ref']} (sha256 {str(model.get('sha256', '?'))[:12]}…)")

    if with_entropies:
        ticks = "".join(
            f'<span class="tick {cls}" style="left:{100 * v / vmax:.2f}%">{lab}</span>'
            for v, lab, cls in ((0, "0", "lo"), (vmax / 2, f"{vmax / 2:.2f}", "mid"), (vmax, f"≥ {vmax:.2f} nats", "hi"))
        )
        if scheme == "entropy" and threshold is not None:
            ticks += f'<span class="theta" style="left:{100 * threshold / vmax:.2f}%" title="threshold">θ {threshold:.3g}</span>'
        legend = (
            f'<div class="scale"><div class="bar"></div>{ticks}</div>'
            "<p>Each character is shaded by the entropy of its <b>first UTF-8 byte</b>, "
            "H(byte j | BOS, bytes &lt; j) in nats, from white (0) to red "
            f"(the dataset's 99th percentile, {vmax:.2f} nats, and above). Hover a character for its byte index and entropy.</p>"
        )
    else:
        legend = "<p><b>no entropies stored</b> in this dataset: patch boundaries only, no shading and no entropy trace.</p>"
    legend += (
        '<p>Each box is a patch; its thick left edge is the patch start. A character is drawn in the patch '
        'of its first byte; a <span class="patch mid sample"></span> dashed box is a patch that starts '
        "inside the character before it (entropy rules, static and byte schemes and max patch length cuts "
        'count bytes, not characters). ↵ marks a newline, → a tab, <span class="ctl">\\xNN</span> a control character.</p>'
    )

    doc_html = []
    for k, doc in enumerate(documents):
        utf8 = doc.text.encode("utf-8")
        cut = cut_at_character(utf8, max_bytes)
        body, num_shown = render_text(doc, cut, vmax)
        meta = (f"part {esc(doc.part)}, row {doc.row} · {len(utf8):,} bytes · {doc.patch_lengths.size:,} patches"
                + (f" · mean {len(utf8) / doc.patch_lengths.size:.2f} bytes" if doc.patch_lengths.size else ""))
        note = ""
        if cut < len(utf8):
            note = (f'<p class="note">showing the first {cut:,} of {len(utf8):,} bytes '
                    f"({num_shown:,} of {doc.patch_lengths.size:,} patches; --max-bytes sets the limit)</p>")
        trace = ""
        if doc.entropies is not None and cut:
            name = f"trace-{k}.png"
            write_trace(out / name, doc, cut, scheme or "", threshold)
            trace = f'<img class="trace" src="{name}" alt="entropy trace of document {esc(doc.id)}">'
        elif doc.entropies is None:
            trace = '<p class="note">no entropies stored: no entropy trace</p>'
        text_box = f'<div class="doc-text">{body}</div>' if cut else '<p class="note">(empty document)</p>'
        doc_html.append(
            f'<section class="doc" data-doc-id="{esc(doc.id)}" data-patches-shown="{num_shown}">'
            f'<h3>document <code>{esc(doc.id)}</code></h3><p class="meta">{meta}</p>{note}{text_box}{trace}'
            f'<details><summary>plain text</summary><pre class="plain">{esc(utf8[:cut].decode("utf-8"))}</pre></details>'
            "</section>"
        )
    if not documents:
        doc_html.append('<p class="note">this dataset holds no documents</p>')

    if s.patch_length_histogram and sum(s.patch_length_histogram):
        write_histogram(out / "patch-lengths.png", s.patch_length_histogram, s.mean_patch_length)
        histogram = '<img class="hist" src="patch-lengths.png" alt="patch-length histogram">'
    else:
        histogram = '<p class="note">the manifest holds no patch-length histogram</p>'
    quantiles = ""
    if s.entropy_quantiles:
        cells = "".join(f"<th>{esc(k)}</th>" for k in s.entropy_quantiles)
        values = "".join(f"<td>{v:.3f}</td>" for v in s.entropy_quantiles.values())
        quantiles = f'<table class="quantiles"><tr><th></th>{cells}</tr><tr><th>entropy (nats)</th>{values}</tr></table>'

    tree = _render_lineage(lineage(registry, manifest.ref))
    manifest_json = json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False)
    return _PAGE.format(
        title=esc(f"{manifest.ref} · blt-data inspect"),
        ref=esc(manifest.ref),
        summary=esc(" · ".join(summary)),
        legend=legend,
        documents="".join(doc_html),
        histogram=histogram,
        quantiles=quantiles,
        lineage=tree,
        manifest=esc(manifest_json),
        style=_STYLE,
    )


_STYLE = f"""
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; max-width: 1150px; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }}
h3 {{ font-size: 15px; margin-bottom: 2px; }} .meta, .note, .params {{ color: #666; font-size: 13px; }}
.scale {{ position: relative; width: 420px; height: 34px; margin: 8px 0 4px; }}
.scale .bar {{ height: 14px; border: 1px solid #999; background: linear-gradient(to right, #fff, rgb{HIGH_RGB}); }}
.scale .tick {{ position: absolute; top: 17px; font-size: 11px; transform: translateX(-50%); white-space: nowrap; }}
.scale .tick.lo {{ transform: none; }} .scale .tick.hi {{ transform: translateX(-100%); }}
.scale .theta {{ position: absolute; top: -3px; height: 20px; border-left: 2px dashed #000; font-size: 11px; padding-left: 2px; }}
.doc-text {{ font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 14px; line-height: 2.0;
  white-space: pre-wrap; word-break: break-all; border: 1px solid #ddd; padding: 8px 10px; background: #fafafa; }}
.patch {{ border: 1px solid #9aa7bd; border-left: 3px solid #1f4e9c; padding: 2px 0; margin-right: 2px; }}
.patch.mid {{ border-style: dashed; border-left-color: #7b3fa0; }}
.patch:empty {{ display: inline-block; width: 3px; height: 1.1em; vertical-align: text-bottom; }}
.ctl {{ color: #888; font-size: 11px; font-style: italic; }}
.nl::before {{ content: "\\21B5"; color: #999; }} .tab::before {{ content: "\\2192"; color: #999; }}
img.trace, img.hist {{ display: block; max-width: 100%; margin-top: 8px; }}
pre.plain, pre.manifest {{ white-space: pre-wrap; font-size: 12px; background: #f6f6f6; padding: 8px; }}
.lineage ul {{ list-style: none; padding-left: 22px; border-left: 1px dotted #aaa; }} .lineage > ul {{ border: 0; padding-left: 0; }}
.lineage li {{ margin: 4px 0; }} .kind {{ background: #eef; border-radius: 3px; padding: 0 4px; font-size: 12px; }}
table.quantiles {{ border-collapse: collapse; font-size: 13px; }} .quantiles td, .quantiles th {{ border: 1px solid #ddd; padding: 2px 8px; }}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{ref} <span class="kind">patches</span></h1>
<p class="meta">{summary}</p>
<h2>Documents</h2>
<div class="legend">{legend}</div>
{documents}
<h2>Patch lengths (whole dataset)</h2>
{histogram}
{quantiles}
<h2>Lineage</h2>
<div class="lineage"><ul>{lineage}</ul></div>
<h2>Manifest</h2>
<details><summary>manifest.json</summary><pre class="manifest">{manifest}</pre></details>
</body>
</html>
"""
