"""Where plateforme keeps its caches (assets, rendered repositories, Triton workspace, logs)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$PLATEFORME_HOME, defaulting to ~/.cache/plateforme."""
    return Path(os.environ.get("PLATEFORME_HOME", Path.home() / ".cache" / "plateforme")).expanduser()
