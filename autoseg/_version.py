"""The version of autoseg: a leaf that every layer may import (``autoseg.__version__`` re-exports it)."""

__version__ = "0.1.0"
