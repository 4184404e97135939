"""``analyze`` over the processes of ``torchrun`` / ``accelerate launch``.

Each rank analyses every n-th checkpoint (``shard=(rank, world_size)``) into
``OUT/ranks/rank-R-of-N/`` on its own device, one checkpoint at a time; when every rank is done,
rank 0 merges the rank folders (:func:`emolens.run.merge.merge`) and moves the merged tables,
steps and manifest into ``OUT``. A re-run resumes each rank's folder and merges again. The
ranks meet twice (a ``gloo`` process group, used only to exchange a status line), so no rank
exits 0 while another failed.
"""

import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from emolens.run.analyze import analyze
from emolens.run.merge import merge
from emolens.store import layout
from emolens.store.files import LOCK_FILE, folder_lock, read_json, write_json

log = logging.getLogger(__name__)

#: How long a rank waits for the others (a shard of a long series can take many hours).
WAIT = timedelta(days=7)


def launched_ranks() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun or accelerate with more than
    one process (their ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def rank_dir(out: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its shard of the analysis."""
    return Path(out) / "ranks" / f"rank-{rank}-of-{world}"


def rank_device(device: str, local_rank: int) -> str:
    """Each rank on its own GPU (``cuda:LOCAL_RANK``) when the device is cuda or auto with one
    present; any other device as given."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _gather(status: str | None) -> list[str | None]:
    """Every rank's status (None: fine), in rank order."""
    statuses: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    return statuses


def _raise_first(statuses: list[str | None], what: str) -> None:
    for rank, status in enumerate(statuses):
        if status is not None:
            raise RuntimeError(f"rank {rank} failed to {what}: {status}")


def analyze_distributed(
    model_spec, corpus, out_dir: str | Path, config, *, device: str = "auto", **options
) -> Path:
    """:func:`emolens.run.analyze.analyze` split over the launched ranks (see the module doc);
    every rank returns ``out`` once the merge is done, or raises the first rank's error."""
    ranks = launched_ranks()
    if ranks is None:
        raise RuntimeError("analyze_distributed needs torchrun or accelerate launch (WORLD_SIZE>1)")
    if options.pop("shard", None) is not None:
        raise ValueError(
            "--shard splits a series by hand; under torchrun the ranks split it: drop --shard"
        )
    rank, world, local_rank = ranks
    out = Path(out_dir)
    dist.init_process_group("gloo", timeout=WAIT)  # status lines only: no tensors move
    try:
        status = None
        try:
            analyze(
                model_spec,
                corpus,
                rank_dir(out, rank, world),
                config,
                device=rank_device(device, local_rank),
                shard=(rank, world),
                **options,
            )
        except Exception as exc:  # every rank must hear of it, not wait forever
            status = f"{type(exc).__name__}: {exc}"
        _raise_first(_gather(status), "analyse its shard")
        status = None
        if rank == 0:
            try:
                merge_ranks(out, world)
            except Exception as exc:
                status = f"{type(exc).__name__}: {exc}"
        _raise_first(_gather(status), "merge the ranks")
    finally:
        dist.destroy_process_group()
    return out


def merge_ranks(out: Path, world: int) -> None:
    """Merge the ``world`` rank folders of ``out`` into ``out`` itself: the merged folder is
    built beside them and its entries replace ``out``'s by rename; ``last_run.json`` joins the
    ranks' (so a failed step of any rank makes the run fail)."""
    shards = [rank_dir(out, r, world) for r in range(world)]
    with folder_lock(out, "merge"):
        staging = out / ".merging"
        shutil.rmtree(staging, ignore_errors=True)
        merge(shards, staging)
        runs = [read_json(layout.ResultsLayout(s).last_run) for s in shards]
        write_json(
            layout.ResultsLayout(staging).last_run,
            {
                "finished": max(r["finished"] for r in runs),
                "steps_done": sorted(s for r in runs for s in r["steps_done"]),
                "failures": [f for r in runs for f in r["failures"]],
                "series_problems": runs[0]["series_problems"],
                "ranks": [str(s) for s in shards],
                "seconds": max(r["seconds"] for r in runs),
            },
        )
        for entry in sorted(staging.iterdir()):
            if entry.name == LOCK_FILE:
                continue
            target, old = out / entry.name, out / f".{entry.name}.old"
            _remove(old)
            if target.exists():
                target.rename(old)
            entry.rename(target)
            _remove(old)
        shutil.rmtree(staging)
    log.info("merged %d ranks into %s", world, out)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
