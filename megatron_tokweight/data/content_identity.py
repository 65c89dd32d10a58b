"""What a prepared dataset *is*, by content rather than by path.

`prepare` records the sha256 of the `.bin` and the `.idx` it wrote in the sidecar's meta.json
(`content`). From that:
- `verify_content(prefix, metadata)`: the files under PREFIX are the ones the sidecar describes.
  It catches a `.bin` swapped for another of the same size (which passes every structural
  check) and the mix an interrupted `prepare` can leave (new sidecar over old tokens, or the
  reverse). Hashing a large `.bin` takes a while, so a verified file is remembered in
  `PREFIX.tokweight/verified.json` under its size, inode and modification/change times: any
  replacement, copy or in-place write changes one of them and is hashed again.
- `dataset_identity(prefix)`: one digest of the tokens, the index and the sidecar (spans, tasks,
  tokenizer), which checkpoints record so that a resumed run refuses other data.

Sidecars written before `content` existed are identified by hashing their files (cached the
same way); there is nothing recorded to verify them against.
"""
import hashlib
import json
import os
from typing import Dict, Optional

from megatron_tokweight.common.files import atomic_file
from megatron_tokweight.data.sidecar import (
    ARRAY_SPECS,
    SampleMetadata,
    read_sidecar,
    sidecar_dir,
)
from megatron_tokweight.errors import DataFormatError

CACHE = "verified.json"
_CHUNK = 1 << 22


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def _stat_key(path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _cached_sha256(prefix: str, suffix: str) -> str:
    """sha256 of PREFIX + suffix, from the sidecar's cache while the file is unchanged."""
    path = prefix + suffix
    cache_path = os.path.join(sidecar_dir(prefix), CACHE)
    key = _stat_key(path)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(suffix) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    cache = dict(cache) if isinstance(cache, dict) else {}
    cache[suffix] = {"stat": key, "sha256": digest}
    try:
        with atomic_file(cache_path, "w") as f:
            json.dump(cache, f)
    except OSError:
        pass  # a read-only dataset is hashed each time instead
    return digest


def content_digests(prefix) -> Dict[str, str]:
    """{"bin_sha256", "idx_sha256"} of the files under PREFIX as they are now."""
    prefix = os.fspath(prefix)
    return {"bin_sha256": _cached_sha256(prefix, ".bin"), "idx_sha256": _cached_sha256(prefix, ".idx")}


def verify_content(prefix, metadata: SampleMetadata) -> None:
    """DataFormatError when PREFIX.bin or PREFIX.idx is not the file the sidecar was written with."""
    recorded = metadata.content
    if not recorded:
        return
    prefix = os.fspath(prefix)
    now = content_digests(prefix)
    for suffix in (".bin", ".idx"):
        key = f"{suffix[1:]}_sha256"
        if recorded.get(key) != now[key]:
            raise DataFormatError(
                f"{prefix}{suffix} is not the file {metadata.where} was prepared with (sha256 {now[key][:12]}..., "
                f"recorded {str(recorded.get(key))[:12]}...): it was replaced, or a `tokweight prepare` was "
                f"interrupted between its renames; prepare {prefix} again"
            )


def dataset_identity(prefix, metadata: Optional[SampleMetadata] = None) -> str:
    """One sha256 of PREFIX's tokens, index and sidecar (arrays and the meta that gives them
    meaning: tasks, span kinds, tokenizer); independent of where the files live."""
    prefix = os.fspath(prefix)
    metadata = read_sidecar(prefix) if metadata is None else metadata
    verify_content(prefix, metadata)
    digest = hashlib.sha256()
    content = metadata.content or content_digests(prefix)
    meaning = {"tokenizer": {k: v for k, v in metadata.tokenizer.items() if k != "path"},
               "task_names": list(metadata.task_names), "span_kinds": list(metadata.span_kinds),
               "token_dtype": metadata.token_dtype, "bin_sha256": content["bin_sha256"],
               "idx_sha256": content["idx_sha256"]}
    digest.update(json.dumps(meaning, sort_keys=True).encode())
    for name in ARRAY_SPECS:
        digest.update(getattr(metadata, name).tobytes())
    return digest.hexdigest()
