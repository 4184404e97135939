"""Where a result came from, beyond package versions: the emolens git commit (when emolens
runs from a checkout) and the accelerator (GPU names, CUDA and cuDNN versions).

Both are cheap and never raise: a missing ``git`` or a machine without a GPU gives ``None``
fields, not an error. ``manifest()`` is the dictionary an analysis writes into its manifest.
"""

import subprocess
from pathlib import Path

import emolens


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(package_dir: str | Path | None = None) -> dict | None:
    """The commit of the checkout emolens is imported from, or ``None`` when it is installed
    from a wheel (its package folder is not tracked by a git repository).

    Returns ``{"commit": 40 hex digits, "dirty": bool (uncommitted changes to tracked files
    under the package), "branch": name or None, "repo": the checkout's root}``.
    """
    package = Path(package_dir or Path(emolens.__file__).parent).resolve()
    root = _git(package, "rev-parse", "--show-toplevel")
    if root is None:
        return None
    # a wheel unpacked inside someone else's repository is not an emolens checkout
    if _git(package, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = _git(package, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(package, "status", "--porcelain", "--untracked-files=no", "--", ".")
    branch = _git(package, "symbolic-ref", "--short", "-q", "HEAD")
    return {"commit": commit, "dirty": bool(status), "branch": branch or None, "repo": root}


def accelerator() -> dict:
    """The torch build's CUDA and cuDNN versions and the visible GPUs (names, memory)."""
    import torch

    info: dict = {"torch_cuda": torch.version.cuda, "cudnn": None, "gpus": []}
    if torch.cuda.is_available():
        # torch.backends.cudnn.version() carries no annotations
        info["cudnn"] = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
    return info


def manifest() -> dict:
    """``{"git": git_commit(), "accelerator": accelerator()}`` for a results manifest."""
    return {"git": git_commit(), "accelerator": accelerator()}
