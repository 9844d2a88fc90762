"""Where svda keeps machine-local caches (converted base models, SVD bases)."""

from __future__ import annotations

import os
from pathlib import Path


def svda_home() -> Path:
    """Return the cache root: ``$SVDA_HOME`` if set, else ``~/.cache/svda``."""
    root = os.environ.get("SVDA_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "svda"
