"""Lineage: a dataset or model and its parents, recursively, read from the registry (DESIGN.md §5).

Every registry entry names its parents (name@vN); walking them answers which corpus, shuffle seed,
entropy model (by sha256) and patching parameters made a dataset. The walk reads manifests only.

Invariant: the walk ends: a reference already shown is not walked again, and the depth is capped.
"""

from __future__ import annotations

from blt_data.registry import Manifest, Registry, RegistryError

MAX_LINEAGE_DEPTH = 32
# Manifest params worth a glance in the lineage, in this order (the full manifest is on the page).
_LINEAGE_KEYS = (
    "step", "source", "split", "limit", "seed", "num_chunks", "val_docs", "scheme", "threshold",
    "target_patch_size", "max_patch_length", "patch_size", "entropies", "num_params", "val_bpb",
)


def lineage(registry: Registry, ref: str, depth: int = 0, seen: set[str] | None = None) -> dict:
    """``ref`` and its parents, recursively: {ref, kind, details, parents, note}."""
    seen = set() if seen is None else seen
    node = {"ref": ref, "kind": None, "details": [], "parents": [], "note": None}
    if ref in seen:
        node["note"] = "shown above"
        return node
    seen.add(ref)
    try:
        manifest = registry.resolve_any(ref)
    except RegistryError:
        node["note"] = "not in this registry"
        return node
    node.update(ref=manifest.ref, kind=manifest.kind, details=key_params(manifest))
    if depth >= MAX_LINEAGE_DEPTH:
        node["note"] = "lineage cut here"
        return node
    node["parents"] = [lineage(registry, p, depth + 1, seen) for p in manifest.parents]
    return node


def key_params(manifest: Manifest) -> list[str]:
    p = manifest.params
    out = []
    model = p.get("model")
    if isinstance(model, dict) and "ref" in model:  # a patches dataset's entropy model
        out.append(f"entropy model {model['ref']} (sha256 {str(model.get('sha256', '?'))[:12]}…)")
    if manifest.kind in ("entropy-model", "blt-checkpoint") and p.get("sha256"):
        out.append(f"sha256 {p['sha256'][:12]}…")
    for key in _LINEAGE_KEYS:
        if key == "patch_size" and p.get("scheme") != "static":
            continue  # a PatchRule default that only the static scheme uses
        if p.get(key) is not None and p.get(key) != "":
            value = p[key]
            out.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if p.get("repatched_from"):
        out.append(f"repatched from {p['repatched_from']}")
    return out
