"""Which code made a result: the git commit of the checkout ssl_nnunet runs from."""
from __future__ import annotations

import os
import subprocess
from typing import Optional


def project_git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout this package runs from, with ``+dirty`` when tracked files have
    local changes; ``None`` outside a git checkout or without git."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
