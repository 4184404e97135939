"""On-disk formats: atomic writes, tensors in safetensors, tables in CSV, provenance in JSON.

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written file under a final name.
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

NUMERICS_MODE = "raw-hf"
NUMERICS_NOTE = (
    "TransformerBridge default numerics: raw HF weights, no folded norms, no "
    "centred unembedding (logits equal the HF model's)"
)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: object) -> Path:
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.7g")
    return Path(path)


def save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata_: Mapping[str, object] | None = None,
) -> Path:
    """Save tensors (made contiguous, on CPU) with JSON-encoded metadata in the header."""
    meta = {k: json.dumps(v, ensure_ascii=False, default=str) for k, v in (metadata_ or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), meta)
    return Path(path)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(str(path)), meta


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("emolens", "transformer-lens", "transformers", "torch", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def stable_hash(data: object) -> str:
    """A short sha256 of JSON-serialisable data (sorted keys): the key of a cached result."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


LOCK_FILE = ".emolens.lock"


class FolderInUse(RuntimeError):
    """Another emolens process holds the lock of a results folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: Path) -> dict:
    for _ in range(20):  # the holder writes its line right after taking the lock
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            text = ""
        if text:
            try:
                holder: dict = json.loads(text)
                return holder
            except json.JSONDecodeError:
                pass
        time.sleep(0.05)
    return {}


@contextmanager
def folder_lock(folder: str | Path, command: str = "analyze") -> Iterator[Path]:
    """Hold ``folder/.emolens.lock`` for the duration: a second process gets
    :class:`FolderInUse` naming the holder's pid and host.

    The lock is an ``flock`` on the file, so the kernel releases it when its holder dies; the
    file keeps the holder's pid and host, and a file left by a dead holder (a stale lock) is
    taken over with a warning.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(path)
            raise FolderInUse(
                f"{folder} is in use by another emolens process (pid {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, {holder.get('command', '?')} since "
                f"{holder.get('since', '?')}); wait for it to finish or use another --out"
            ) from None
        previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if previous:
            try:
                old = json.loads(previous)
            except json.JSONDecodeError:
                old = {}
            same_host = old.get("host") == socket.gethostname()
            alive = same_host and isinstance(old.get("pid"), int) and _pid_alive(old["pid"])
            if not alive:
                log.warning(
                    "taking over the stale lock %s of pid %s on %s (no longer running)",
                    path,
                    old.get("pid", "?"),
                    old.get("host", "?"),
                )
        mine = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (mine + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # closing releases the flock
