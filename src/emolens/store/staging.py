"""Step folders written atomically: a step is staged beside its folder and swapped in whole
only when finished; an interrupted swap is completed or rolled back; a damaged step is
noticed (its recorded file sizes) and recomputed."""

import logging
import os
import shutil
from pathlib import Path

from emolens.store import layout
from emolens.store.files import (
    read_json,
)

log = logging.getLogger(__name__)


def recover_steps(out: Path) -> None:
    """Undo what an interrupted run left (called with the folder's lock held): staging folders
    are dropped, a swap cut between its two renames is completed or rolled back."""
    steps = layout.ResultsLayout(out).steps_dir
    if not steps.is_dir():
        return
    for stage in steps.glob(".step-*.staging"):
        shutil.rmtree(stage, ignore_errors=True)
    for old in steps.glob(".step-*.old"):
        final = steps / old.name[1 : -len(".old")]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


def commit_step(stage: Path, final: Path) -> None:
    """Swap a finished staging folder onto the step folder (two renames, then clean up)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    stage.rename(final)
    if old.exists():
        shutil.rmtree(old)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # files are replaced by rename, never written in place
    except OSError:
        shutil.copy2(source, target)


def step_problem(folder: Path, key: str) -> str | None:
    """Why the step in ``folder`` cannot be reused (None: finished with ``key`` and intact).

    A problem that means damage (an unreadable ``done.json``, a missing or resized file) is
    logged as a warning naming the file; the step is then recomputed."""
    marker = layout.StepFiles(folder).done
    if not marker.exists():
        return "not finished"
    try:
        info = read_json(marker)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        log.warning(
            "%s is unreadable (%s); recomputing step %s", marker, exc, folder.name.split("-")[-1]
        )
        return f"unreadable {marker}"
    if info.get("key") != key:
        return "made with other inputs"
    for name, size in (info.get("files") or {}).items():
        path = folder / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes, not {size}"
            log.warning(
                "%s %s (damaged after it was written); recomputing step %s",
                path,
                found,
                info.get("step"),
            )
            return f"{path} {found}"
    return None
