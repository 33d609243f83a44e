"""Checkpoint files: plain containers and tensors only, written atomically, loaded with weights_only.

Shared by the trainer and the predictor; torch is imported only when a checkpoint is read or
written, so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoseg.atomic import atomic_path
from autoseg.errors import ConfigError

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
    import torch

    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no code runs from the file).

    Args:
        required: keys the caller needs; a checkpoint without one is refused.

    Raises:
        ConfigError: missing, unreadable, not an autoseg checkpoint of :data:`CHECKPOINT_FORMAT`,
            or lacking a required key.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          "the file is corrupt or not an autoseg checkpoint") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not an autoseg checkpoint of format {CHECKPOINT_FORMAT}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{path}: checkpoint lacks {key!r}; it was not written by 'autoseg train'")
    return data
