"""Hugging Face checkpoint directories: read and write config.json + safetensors weights.

Reading uses `safetensors.numpy` (no torch): one `model.safetensors`, or the shards listed in
`model.safetensors.index.json`. Pickled `pytorch_model.bin` weights are refused, never
unpickled. Writing produces one `model.safetensors` that `from_pretrained` loads.

What it leaves out: what the tensors mean (`hf.py` and the families).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from plm_jax.errors import DataError

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "quote_names", "read_hf_checkpoint", "write_hf_checkpoint"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_hf_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads `config.json` and the safetensors weights of a Hugging Face checkpoint directory.

    Args:
      path: the directory (as written by `save_pretrained(..., safe_serialization=True)`).

    Returns:
      (hf_config, tensors): the parsed config.json and every tensor by its HF name.

    Raises:
      DataError: a missing directory, config or weights file; a corrupt file; an index that
        names missing tensors or holds duplicates; or pickle-only weights.
    """
    root = Path(path)
    if not root.is_dir():
        hint = "; pass its directory" if root.is_file() else ""
        raise DataError(f"Hugging Face checkpoint {str(root)!r} is not a directory{hint}")
    hf_config = _read_json(root / "config.json", "config")
    if (root / WEIGHTS_NAME).is_file():
        return hf_config, _read_safetensors(root / WEIGHTS_NAME)
    if (root / INDEX_NAME).is_file():
        return hf_config, _read_shards(root)
    pickles = [name for name in PICKLE_NAMES if (root / name).exists()]
    if pickles:
        raise DataError(
            f"{str(root)!r} holds only PyTorch pickle weights ({pickles[0]}); plm_jax never "
            "unpickles files (that can run arbitrary code). Convert to safetensors: load it in "
            "transformers and call save_pretrained(out_dir, safe_serialization=True)"
        )
    raise DataError(f"{str(root)!r} has no {WEIGHTS_NAME} or {INDEX_NAME}; nothing to load")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{str(path)!r} not found; a Hugging Face checkpoint needs its {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{str(path)!r} is not valid JSON ({e}); the {what} is corrupt") from e
    if not isinstance(data, dict):
        raise DataError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{str(path)!r} is not a readable safetensors file ({e}); it is corrupt or "
            "truncated, re-download or re-export it"
        ) from e


def _read_shards(root: Path) -> dict[str, np.ndarray]:
    index = _read_json(root / INDEX_NAME, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataError(f"{str(root / INDEX_NAME)!r} has no 'weight_map' of tensor -> file")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = root / str(shard)
        if not shard_path.is_file():
            raise DataError(f"shard {str(shard_path)!r} named in {INDEX_NAME} not found")
        for name, value in _read_safetensors(shard_path).items():
            if name in tensors:
                raise DataError(f"tensor {name!r} appears in more than one shard of {str(root)!r}")
            tensors[name] = value
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise DataError(
            f"{INDEX_NAME} in {str(root)!r} lists tensors no shard holds: {quote_names(missing)}"
        )
    return tensors


def write_hf_checkpoint(
    path: str | Path, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    """Writes `config.json` and one `model.safetensors` that transformers can load.

    Args:
      path: the directory, created if needed; existing config.json/model.safetensors are
        replaced.
      hf_config: the config.json content (from `params_to_hf`).
      tensors: contiguous numpy arrays by HF name.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(x) for name, x in tensors.items()}
    # transformers checks this metadata to know the tensors are in PyTorch layout.
    save_file(arrays, root / WEIGHTS_NAME, metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def quote_names(names: list[str], limit: int = 8) -> str:
    """`'a', 'b' and 3 more`: names for an error message, without flooding it."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more
