"""Every file name of a results folder, in one place.

A results folder (``emolens analyze --out DIR``) holds::

    DIR/manifest.json, label_audit.json, last_run.json     provenance of the whole analysis
    DIR/<table>.csv                                          the top-level tables (TABLES)
    DIR/report.html                                          emolens report
    DIR/steps/step-000100/                                   one finished checkpoint (StepFiles)
    DIR/steps/.step-000100.staging/                          a step being written
    DIR/failed/step-000100/                                  what a failed step left

Two tensor formats live in a step folder, on purpose: the large measured artifacts
(activations, vectors, steering) are ``<stem>.safetensors`` with a ``<stem>.json`` sidecar
(:func:`emolens.measure.activations.save_artifact`), whose metadata (sample ids, label names,
layers, versions) a user can read without loading tensors; the small derived ones (readout,
keep mask, causal metric) are one ``.safetensors`` file with JSON metadata in its header
(:func:`emolens.store.files.save_tensors`), so they are replaced by a single atomic rename.
"""

from dataclasses import dataclass
from pathlib import Path

#: File names inside a step folder.
DONE = "done.json"
SENSITIVITY = "sensitivity.csv"
FILTERING = "filtering.csv"
DLA = "dla.csv"
LABEL_AUDIT = "label_audit.json"
ACTIVATIONS = "activations.safetensors"
ACTIVATIONS_META = "activations.json"
ACTIVATIONS_KEY = "activations.key"
READOUT = "readout.safetensors"
KEEP = "keep.safetensors"
CAUSAL_METRIC = "causal_metric.safetensors"
VECTORS = "vectors.safetensors"
VECTORS_META = "vectors.json"
ERROR = "error.json"
ACCURACY = "accuracy.csv"

#: What a step's activation cache consists of (reused by a later run with the same key).
ACTIVATION_FILES = (ACTIVATIONS, ACTIVATIONS_META, LABEL_AUDIT, ACTIVATIONS_KEY)

#: File names at the top of a results folder.
MANIFEST = "manifest.json"
LAST_RUN = "last_run.json"
REPORT = "report.html"
LOCALISATION = "localisation.csv"
DEMO_TIMING = "demo_timing.json"
STEPS_DIR = "steps"
FAILED_DIR = "failed"

#: The top-level tables, ``DIR/<name>.csv`` (written by ``analyze``/``merge``).
TABLES = (
    "sensitivity",
    "filtering",
    "steps",
    "dla",
    "attribution",
    "transfer",
    "random_baseline",
    "geometry",
    "probes",
    "change_summary",
    "change_omnibus",
    "kept_set_effect",
    "figure2_bands",
    "sensitivity_trends",
    "heads",
    "logit_lens",
)


def step_name(step: int) -> str:
    """The folder name of checkpoint ``step``: ``step-000100``."""
    return f"step-{int(step):06d}"


def step_number(folder: str | Path) -> int:
    """The step of a folder named by :func:`step_name`."""
    return int(Path(folder).name.split("-")[-1])


@dataclass(frozen=True, init=False)
class StepFiles:
    """The files of one step folder (``DIR/steps/step-NNNNNN`` or its staging/failed twin)."""

    folder: Path

    def __init__(self, folder: str | Path) -> None:
        object.__setattr__(self, "folder", Path(folder))

    @property
    def done(self) -> Path:
        return self.folder / DONE

    @property
    def sensitivity(self) -> Path:
        return self.folder / SENSITIVITY

    @property
    def filtering(self) -> Path:
        return self.folder / FILTERING

    @property
    def dla(self) -> Path:
        return self.folder / DLA

    @property
    def label_audit(self) -> Path:
        return self.folder / LABEL_AUDIT

    @property
    def activations(self) -> Path:
        return self.folder / ACTIVATIONS

    @property
    def activations_meta(self) -> Path:
        return self.folder / ACTIVATIONS_META

    @property
    def activations_key(self) -> Path:
        return self.folder / ACTIVATIONS_KEY

    @property
    def readout(self) -> Path:
        return self.folder / READOUT

    @property
    def keep(self) -> Path:
        return self.folder / KEEP

    @property
    def causal_metric(self) -> Path:
        return self.folder / CAUSAL_METRIC

    @property
    def error(self) -> Path:
        return self.folder / ERROR

    @property
    def is_done(self) -> bool:
        return self.done.exists()


@dataclass(frozen=True, init=False)
class ResultsLayout:
    """The files of a results folder ``root``."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def label_audit(self) -> Path:
        return self.root / LABEL_AUDIT

    @property
    def last_run(self) -> Path:
        return self.root / LAST_RUN

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def localisation(self) -> Path:
        return self.root / LOCALISATION

    @property
    def steps_dir(self) -> Path:
        return self.root / STEPS_DIR

    @property
    def failed_root(self) -> Path:
        return self.root / FAILED_DIR

    def table(self, name: str) -> Path:
        """``DIR/<name>.csv``, one of :data:`TABLES`."""
        if name not in TABLES:
            raise ValueError(f"{name!r} is not a results table; choose from {', '.join(TABLES)}")
        return self.root / f"{name}.csv"

    def step(self, step: int) -> StepFiles:
        """The finished folder of checkpoint ``step``."""
        return StepFiles(self.steps_dir / step_name(step))

    def staging(self, step: int) -> StepFiles:
        """Where a step's new files are written; swapped onto :meth:`step` only on success."""
        return StepFiles(self.steps_dir / f".{step_name(step)}.staging")

    def failed(self, step: int) -> StepFiles:
        """What a failed step left: its error, filtering counts and activations."""
        return StepFiles(self.failed_root / step_name(step))

    def step_folders(self) -> list[StepFiles]:
        """Every ``steps/step-*`` folder, finished or not, in step order."""
        return [StepFiles(p) for p in sorted(self.steps_dir.glob("step-*"))]

    def finished_steps(self) -> list[StepFiles]:
        """The step folders holding a ``done.json``, in step order."""
        return [s for s in self.step_folders() if s.is_done]
