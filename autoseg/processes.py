"""The start method of the worker pools of the torch-free stages (check, fingerprint, preprocess, evaluate).

``fork`` is the cheap one (no re-import; the children share the parent's pages) and is safe in a
process that has only the torch-free stages loaded, as the CLI commands ``check``, ``plan``,
``preprocess`` and ``evaluate`` are. A process that has imported torch runs its thread pools (intra-op,
OpenMP, oneDNN, OpenVINO): forking it can copy a lock another thread holds, and the child then waits for
it forever — seen as a hung pool when ``autoseg train`` preprocesses on demand, and in the test suite.
Such a process gets ``spawn`` pools: fresh interpreters, a second or so to start.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import sys


def pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` where it is safe (POSIX, torch not imported in this process), else ``spawn``."""
    if os.name == "posix" and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


__all__ = ["pool_context"]
