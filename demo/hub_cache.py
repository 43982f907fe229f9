"""Lay out a local directory as a huggingface_hub cache entry, so Hub loading works fully offline.

Why: code that loads ``org/name`` adapters from the Hub must be tested without network access.
``huggingface_hub`` (2.x) resolves ``snapshot_download``/``hf_hub_download`` with
``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``) purely from this layout, which mirrors
``file_download.py`` / ``_tree_cache.py``::

    <cache_dir>/models--<org>--<name>/
        blobs/<blob id>                       contents; id = sha256 for LFS files, else git blob sha1
        snapshots/<commit>/<path/in/repo>     relative symlinks ../../blobs/<blob id>
        refs/main                             the commit sha (40 hex chars, no newline)
        trees/<commit>.json                   tree listing (marks the snapshot complete)
    <cache_dir>/CACHEDIR.TAG

The commit sha is derived from the files' contents unless given, so the same input gives the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

# Files the Hub stores through Git LFS (subset of its default .gitattributes); their etag is the sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy")

_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by huggingface_hub.\n"
    "# For information about cache directory tags, see:\n"
    "#\thttps://bford.info/cachedir/\n"
)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``demo-org/sql-lora`` -> ``models--demo-org--sql-lora`` (as ``huggingface_hub.file_download``)."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def fill_hub_cache(
    cache_dir: str | Path,
    repo_id: str,
    src_dir: str | Path,
    revision_sha: str | None = None,
    *,
    subfolder: str | None = None,
    revision: str = "main",
) -> Path:
    """Put every file of ``src_dir`` into the cache as one commit of ``repo_id``; return the snapshot dir.

    With ``subfolder="a/b"`` the files live under ``a/b/`` in the repo (load with ``subfolder=``).
    ``refs/<revision>`` is pointed at the commit (a later call for the same repo replaces it).
    """
    if revision_sha is not None and not re.fullmatch(r"[0-9a-f]{40}", revision_sha):
        raise ValueError(f"revision_sha must be 40 lowercase hex chars, got {revision_sha!r}")
    src = Path(src_dir)
    prefix = "/".join(p for p in (subfolder or "").split("/") if p)
    files = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        files[f"{prefix}/{rel}" if prefix else rel] = path.read_bytes()
    if not files:
        raise ValueError(f"no files under {src}")

    tree: dict[str, dict] = {}
    for rel, data in files.items():
        if rel.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            tree[rel] = {
                "size": len(data),
                "blob_id": _git_blob_sha1(pointer.encode()),
                "lfs_sha256": sha256,
                "lfs_size": len(data),
            }
        else:
            tree[rel] = {"size": len(data), "blob_id": _git_blob_sha1(data)}
    if revision_sha is None:
        listing = "".join(f"{rel}\0{info['blob_id']}\n" for rel, info in sorted(tree.items()))
        revision_sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    cache = Path(cache_dir)
    storage = cache / repo_folder_name(repo_id)
    snapshot = storage / "snapshots" / revision_sha
    for rel, data in files.items():
        etag = tree[rel].get("lfs_sha256", tree[rel]["blob_id"])
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        pointer_path = snapshot / rel
        pointer_path.parent.mkdir(parents=True, exist_ok=True)
        if pointer_path.is_symlink() or pointer_path.exists():
            pointer_path.unlink()
        os.symlink(os.path.relpath(blob, pointer_path.parent), pointer_path)

    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision_sha)
    trees = storage / "trees"
    trees.mkdir(exist_ok=True)
    listing_json = {"format_version": 1, "files": {rel: tree[rel] for rel in sorted(tree)}}
    (trees / f"{revision_sha}.json").write_text(json.dumps(listing_json, indent=1))
    tag = cache / "CACHEDIR.TAG"
    if not tag.exists():
        tag.write_text(_CACHEDIR_TAG)
    return snapshot
