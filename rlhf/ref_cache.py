"""On-disk cache of reference log-probs, keyed by what they depend on.

The key hashes (1) the token rows (prompt, chosen and rejected ids, image paths with their size and modification
time, tile budgets), (2) the reference weights (a hash of every parameter), (3) the settings that change the
log-probs (max_length, dtype, how they are computed). A file whose key, row count or format differs is stale: it is
reported and recomputed, never used. Files are safetensors (two float tensors) with the key in their metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)
FORMAT = "mmalign-ref-logps-v1"


def rows_fingerprint(dataset) -> str:
    """sha256 over the token rows and the identity (path, size, mtime) of every image they read."""
    digest = hashlib.sha256()
    stats: dict[str, list[int]] = {}
    for row in dataset:
        for path in row.get("image_paths") or []:
            if path not in stats:
                st = os.stat(path)
                stats[path] = [st.st_size, st.st_mtime_ns]
        digest.update(json.dumps([row["prompt_ids"], row["chosen_ids"], row["rejected_ids"],
                                  row.get("image_paths") or [], row.get("max_patches")]).encode())
    digest.update(json.dumps(sorted(stats.items())).encode())
    return digest.hexdigest()


def cache_key(rows_hash: str, model_hash: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps([FORMAT, rows_hash, model_hash, settings], sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | Path, split: str, key: str) -> Path:
    return Path(cache_dir) / f"ref_logps.{split}.{key[:16]}.safetensors"


def load(path: Path, key: str, num_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) log-probs, or None when the file is absent or does not match."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            chosen, rejected = f.get_tensor("ref_chosen_logps"), f.get_tensor("ref_rejected_logps")
    except Exception as err:  # a torn or foreign file is stale, not fatal
        logger.warning("reference log-prob cache %s is unreadable (%s): recomputing", path, err)
        return None
    if meta.get("format") != FORMAT or meta.get("key") != key or len(chosen) != num_rows or len(rejected) != num_rows:
        logger.warning("reference log-prob cache %s does not match this data, model and settings: recomputing", path)
        return None
    return chosen, rejected


def save(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor, settings: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"ref_chosen_logps": chosen.float().contiguous(), "ref_rejected_logps": rejected.float().contiguous()},
              str(tmp), metadata={"format": FORMAT, "key": key, "settings": json.dumps(settings, sort_keys=True)})
    os.replace(tmp, path)  # a reader never sees a half-written file
