"""Bad inputs and faults against the ``emolens`` command on the tiny model: for each kind, does
it give one clear line and a non-zero exit, a traceback, a wrong exit 0, or damage to an earlier
finished results folder? Issue 11.

    python benchmarks/bad_inputs.py [--only SUBSTRING] [--verbose]

Each case runs ``emolens.cli.main`` in this process (the same code path as the command, minus
the interpreter start-up) with ``--out`` pointing at a fresh copy of a finished results folder,
and compares that folder with the pristine copy afterwards: every step file and top-level
table must be byte-identical and the manifest must describe the same analysis. Cases marked
``ok`` are faults the run must survive (exit 0, results recomputed or kept).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emolens.cli import main
from emolens.data.corpus import load_corpus
from emolens.store.files import load_tensors

try:
    from emolens.store.files import folder_lock
except ImportError:  # an emolens without the lock (to measure it): nothing to hold

    def folder_lock(folder, command="analyze"):
        return contextlib.nullcontext()


from emolens.testing.tiny import tiny_random_model

FAST = [
    "--layers",
    "1,-1",
    "--steer-layers",
    "-1",
    "--alphas",
    "0,2",
    "--n-prompts",
    "2",
    "--min-count",
    "1",
    "--batch-size",
    "32",
    "--filter-mode",
    "none",
    "--dla-per-label",
    "1",
    "--n-boot",
    "10",
    "--device",
    "cpu",
]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")


@dataclass
class Case:
    name: str
    argv: list[str]  # the command; "{out}" is the results folder
    expect: str = "error"  # "error": non-zero with one line; "ok": exit 0
    setup: object = None  # callable(out: Path) run before the command
    uses_out: bool = True
    hold_lock: bool = False
    fresh: bool = False  # "{out}" is a new empty folder (for faults the identity check would
    # otherwise refuse first)
    notes: list = field(default_factory=list)


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def build_inputs(root: Path) -> dict:
    """Models, corpora and folders the cases point at."""
    model = tiny_random_model(root / "model")
    samples = load_corpus(None).head_per_label(4).samples
    rows = [{"id": s.id, "text": s.text, "label": s.label} for s in samples]
    x = {"model": model, "root": root}
    x["data"] = write_jsonl(root / "corpus.jsonl", rows)
    # models
    (root / "empty").mkdir()
    (root / "no-weights").mkdir()
    shutil.copy(model / "config.json", root / "no-weights" / "config.json")
    for name, mutate in {
        "truncated": lambda w: w.write_bytes(w.read_bytes()[: w.stat().st_size // 2]),
        "garbage-weights": lambda w: w.write_bytes(b"not safetensors at all"),
        "empty-weights": lambda w: w.write_bytes(b""),
        "one-byte-short": lambda w: w.write_bytes(w.read_bytes()[:-1]),
    }.items():
        shutil.copytree(model, root / name)
        mutate(next((root / name).glob("*.safetensors")))
    for name, text in {
        "config-not-json": "{not json",
        "config-list": "[1, 2]",
        "config-no-type": '{"hello": 1}',
        "config-empty": "",
        "config-no-depth": '{"model_type": "llama"}',
    }.items():
        shutil.copytree(model, root / name)
        (root / name / "config.json").write_text(text)
    for name, cfg, weights in (
        ("adapter-no-base", '{"peft_type": "LORA"}', True),
        ("adapter-no-weights", '{"base_model_name_or_path": "x"}', False),
        ("adapter-missing-base", '{"base_model_name_or_path": "/nope/base"}', True),
        ("adapter-bad-json", "{", True),
    ):
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(cfg)
        if weights:
            (root / name / "adapter_model.safetensors").write_bytes(b"x")
    (root / "a-file").write_text("hello")
    # run folders
    run = root / "run-no-base"
    (run / "checkpoint-2").mkdir(parents=True)
    shutil.copytree(model, run / "checkpoint-2", dirs_exist_ok=True)
    run = root / "run-missing-base"
    shutil.copytree(root / "run-no-base", run)
    (run / "emolens_run.json").write_text(json.dumps({"base_model": "/nope/base"}))
    run = root / "run-all-half-written"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "config.json").write_text("{}")
    (run / "emolens_run.json").write_text(json.dumps({"base_model": str(model)}))
    run = root / "run-corrupt-ckpt"
    shutil.copytree(model, run / "checkpoint-2")
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"junk")
    (run / "emolens_run.json").write_text(json.dumps({"base_model": str(model)}))
    run = root / "run-bad-base-json"
    shutil.copytree(model, run / "checkpoint-2")
    (run / "emolens_run.json").write_text("{oops")
    # corpora
    d = root / "data"
    d.mkdir()
    x["data_bad"] = {
        "missing": d / "nope.tsv",
        "empty": (d / "empty.tsv", ""),
        "header-only": (d / "header.tsv", "id\temotion\tgenerated_text\n"),
        "binary": (d / "binary.tsv", None),
        "no-label-column": (d / "nolabel.tsv", "id\ttext\n1\thello\n2\tworld\n"),
        "no-text-column": (d / "notext.tsv", "id\temotion\n1\tjoy\n"),
        "unknown-labels": (d / "unknown.tsv", "id\temotion\ttext\n1\tglee\tx\n2\tmirth\ty\n"),
        "bad-jsonl": (d / "bad.jsonl", '{"text": "a", "label": "joy"}\n{oops\n'),
        "jsonl-not-objects": (d / "list.jsonl", "[1, 2]\n[3, 4]\n"),
        "directory": d,
        "empty-texts": (
            d / "emptytexts.jsonl",
            "".join(
                json.dumps({"id": str(i), "text": "", "label": r["label"]}) + "\n"
                for i, r in enumerate(rows)
            ),
        ),
        "no-neutral": (
            d / "noneutral.jsonl",
            "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["label"] != "no-emotion"
            ),
        ),
        "one-neutral": (
            d / "oneneutral.jsonl",
            "".join(
                json.dumps(r, ensure_ascii=False) + "\n"
                for i, r in enumerate(rows)
                if r["label"] != "no-emotion"
                or r["id"] == next(q["id"] for q in rows if q["label"] == "no-emotion")
            ),
        ),
        "only-neutral": (
            d / "onlyneutral.jsonl",
            "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["label"] == "no-emotion"
            ),
        ),
        "duplicate-ids": (
            d / "dups.jsonl",
            "".join(json.dumps({**r, "id": "same"}, ensure_ascii=False) + "\n" for r in rows),
        ),
        "too-long-text": (
            d / "long.jsonl",
            "".join(
                json.dumps({**r, "text": r["text"] * (1 if i else 400)}, ensure_ascii=False) + "\n"
                for i, r in enumerate(rows)
            ),
        ),
        "latin1-bytes": (d / "latin1.tsv", None),
        "missing-label-values": (
            d / "nolabels.jsonl",
            "".join(
                json.dumps({"id": r["id"], "text": r["text"], "label": None}) + "\n" for r in rows
            ),
        ),
    }
    for key, value in list(x["data_bad"].items()):
        if isinstance(value, tuple):
            path, text = value
            if key == "binary":
                path.write_bytes(os.urandom(2000))
            elif key == "latin1-bytes":
                path.write_bytes("id\temotion\ttext\n1\tjoy\tcaf\xe9 \xff\xfe\n".encode("latin-1"))
            else:
                path.write_text(text, encoding="utf-8")
            x["data_bad"][key] = path
    return x


def analyze(x, *extra, model=None, data=None) -> list[str]:
    return [
        "analyze",
        "--model",
        str(model or x["model"]),
        "--data",
        str(data or x["data"]),
        "--out",
        "{out}",
        *FAST,
        *extra,
    ]


def cases(x) -> list[Case]:
    root = x["root"]
    out = []
    models = [
        "nope",
        "empty",
        "no-weights",
        "truncated",
        "garbage-weights",
        "empty-weights",
        "one-byte-short",
        "config-not-json",
        "config-list",
        "config-no-type",
        "config-empty",
        "config-no-depth",
        "adapter-no-base",
        "adapter-no-weights",
        "adapter-missing-base",
        "adapter-bad-json",
        "a-file",
        "run-no-base",
        "run-missing-base",
        "run-all-half-written",
        "run-corrupt-ckpt",
        "run-bad-base-json",
    ]
    for name in models:
        out.append(Case(f"model: {name}", analyze(x, model=root / name)))
    for name, model, extra, data in (
        ("run-all-half-written", root / "run-all-half-written", [], None),
        ("run-corrupt-ckpt (step fails)", root / "run-corrupt-ckpt", [], None),
        ("hub id not in cache", "org/model-not-in-cache", [], None),
        ("--device-map bogus", None, ["--device-map", "bogus"], None),
        ("--filter-mode self (0 neutral right)", None, ["--filter-mode", "self"], None),
        ("text longer than the context", None, [], x["data_bad"]["too-long-text"]),
    ):
        out.append(
            Case(f"fresh out, {name}", analyze(x, *extra, model=model, data=data), fresh=True)
        )
    for spec in (
        "no-such-alias",
        "a b c",
        "./relative/nope",
        "~/nope-model",
        "x.gguf",
        "org/model-not-in-cache",
    ):
        out.append(Case(f"model spec: {spec}", analyze(x, model=spec)))
    bad_options = {
        "--layers 99": ["--layers", "99"],
        "--layers -99": ["--layers", "-99"],
        "--layers a": ["--layers", "a"],
        "--layers empty": ["--layers", ""],
        "--layers 1,1": ["--layers", "1,1"],
        "--layers mid,x": ["--layers", "mid,x"],
        "--steer-layers 99": ["--steer-layers", "99"],
        "--steer-layers not collected": ["--layers", "-1", "--steer-layers", "1"],
        "--steer-layers x": ["--steer-layers", "x"],
        "--alphas empty": ["--alphas", ""],
        "--alphas a": ["--alphas", "a"],
        "--alphas nan": ["--alphas", "0,nan"],
        "--alphas inf": ["--alphas", "inf"],
        "--alphas 1,,2": ["--alphas", "1,,2"],
        "--n-prompts 0": ["--n-prompts", "0"],
        "--n-prompts -1": ["--n-prompts", "-1"],
        "--n-prompts 1000": ["--n-prompts", "1000"],
        "--n-prompts x": ["--n-prompts", "x"],
        "--min-count 0": ["--min-count", "0"],
        "--min-count 1000": ["--min-count", "1000"],
        "--min-count 4 (neutral short)": ["--min-count", "4"],
        "--batch-size 0": ["--batch-size", "0"],
        "--n-boot 0": ["--n-boot", "0"],
        "--n-boot -5": ["--n-boot", "-5"],
        "--dla-per-label -1": ["--dla-per-label", "-1"],
        "--prompt-seed x": ["--prompt-seed", "x"],
        "--seed 1.5": ["--seed", "1.5"],
        "--filter-mode bogus": ["--filter-mode", "bogus"],
        "--filter-mode self (0 neutral right)": ["--filter-mode", "self"],
        "--alpha-unit bogus": ["--alpha-unit", "bogus"],
        "--positions bogus": ["--positions", "bogus"],
        "--shard 1": ["--shard", "1"],
        "--shard 2/2": ["--shard", "2/2"],
        "--shard a/b": ["--shard", "a/b"],
        "--shard -1/2": ["--shard", "-1/2"],
        "--shard 0/0": ["--shard", "0/0"],
        "--shard with --filter-mode base": ["--shard", "0/2", "--filter-mode", "base"],
        "--split bogus": ["--split", "bogus"],
        "--split test of a plain model": ["--split", "test"],
        "--dtype bogus": ["--dtype", "bogus"],
        "--dtype float64": ["--dtype", "float64"],
        "--dtype int8": ["--dtype", "int8"],
        "--device tpu": ["--device", "tpu"],
        "--device gpu": ["--device", "gpu"],
        "--device cuda:x": ["--device", "cuda:x"],
        "--device mps": ["--device", "mps"],
        "--device-map bogus": ["--device-map", "bogus"],
        "--language xx": ["--language", "xx"],
        "--base missing": ["--base", "/nope/base"],
        "unknown option": ["--no-such-option"],
        "--alphas changed (other settings)": ["--alphas", "0,1"],
        "--n-boot changed (cross-step setting)": ["--n-boot", "11"],
        "--text-column missing": ["--text-column", "nope"],
        "--label-column missing": ["--label-column", "nope"],
    }
    if not torch.cuda.is_available():
        bad_options["--device cuda (none here)"] = ["--device", "cuda"]
        bad_options["--device CUDA:3 (none here)"] = ["--device", "CUDA:3"]
    for name, extra in bad_options.items():
        out.append(Case(f"option: {name}", analyze(x, *extra)))
    for name, path in x["data_bad"].items():
        out.append(Case(f"data: {name}", analyze(x, data=path)))
    out.append(Case("data: bundled:xx", analyze(x, data="bundled:xx")))
    out.append(
        Case(
            "data: bundled with --text-column", analyze(x, "--text-column", "text", data="bundled")
        )
    )
    out.append(
        Case(
            "data: other corpus than the folder's",
            analyze(
                x,
                data=x["data_bad"]["no-neutral"].with_name("other.jsonl"),
            ),
            setup=lambda o, p=x["data"]: _other_corpus(p),
        )
    )
    # the results folder
    out.append(
        Case(
            "out: is a file",
            [
                "analyze",
                "--model",
                str(x["model"]),
                "--data",
                str(x["data"]),
                "--out",
                str(root / "a-file"),
                *FAST,
            ],
            uses_out=False,
        )
    )
    out.append(
        Case(
            "out: corrupt manifest.json",
            analyze(x),
            setup=lambda o: (o / "manifest.json").write_text("{oops"),
        )
    )
    out.append(Case("out: held by another process", analyze(x), hold_lock=True))
    out.append(Case("out: other model", analyze(x, model=x["model_copy"])))
    for damage in (
        "done.json",
        "sensitivity.csv",
        "filtering.csv",
        "activations.safetensors",
        "vectors.safetensors",
        "readout.safetensors",
        "label_audit.json",
    ):
        out.append(
            Case(
                f"out: emptied step file {damage}",
                analyze(x),
                expect="ok",
                setup=lambda o, d=damage: _empty_step_file(o, d),
            )
        )
    out.append(
        Case(
            "out: truncated activations",
            analyze(x),
            expect="ok",
            setup=lambda o: _truncate(o / "steps/step-000000/activations.safetensors"),
        )
    )
    out.append(
        Case("out: stale lock of a dead process", analyze(x), expect="ok", setup=_stale_lock)
    )
    out.append(
        Case(
            "out: leftover staging folder",
            analyze(x),
            expect="ok",
            setup=lambda o: (o / "steps/.step-000000.staging").mkdir(),
        )
    )
    out.append(
        Case(
            "out: half-swapped step (killed between renames)",
            analyze(x),
            expect="ok",
            setup=lambda o: (o / "steps/step-000000").rename(o / "steps/.step-000000.old"),
        )
    )
    out.append(
        Case(
            "model: run with a half-written checkpoint",
            [
                a.replace("{out}", str(root / "half-out"))
                for a in analyze(x, model=root / "run-half")
            ],
            expect="ok",
            uses_out=False,
            setup=lambda o: _half_run(root, x["model"]),
        )
    )
    # merge
    out.append(
        Case(
            "merge: other settings",
            ["merge", "{out}", str(root / "merge-other"), "--out", str(root / "merged-1")],
            setup=lambda o: _edited_copy(o, root / "merge-other", "settings"),
        )
    )
    out.append(
        Case(
            "merge: other model",
            ["merge", "{out}", str(root / "merge-model"), "--out", str(root / "merged-2")],
            setup=lambda o: _edited_copy(o, root / "merge-model", "model"),
        )
    )
    out.append(
        Case(
            "merge: other data",
            ["merge", "{out}", str(root / "merge-data"), "--out", str(root / "merged-3")],
            setup=lambda o: _edited_copy(o, root / "merge-data", "data"),
        )
    )
    out.append(
        Case("merge: into a non-empty folder", ["merge", "{out}", "--out", str(root / "model")])
    )
    out.append(Case("merge: into itself", ["merge", "{out}", "--out", "{out}"]))
    out.append(
        Case(
            "merge: missing manifest",
            ["merge", str(root / "empty"), "--out", str(root / "merged-4")],
        )
    )
    out.append(
        Case(
            "merge: corrupt manifest",
            ["merge", "{out}", "--out", str(root / "merged-5")],
            setup=lambda o: (o / "manifest.json").write_text("{oops"),
        )
    )
    out.append(
        Case(
            "merge: same shard twice", ["merge", "{out}", "{out}", "--out", str(root / "merged-6")]
        )
    )
    out.append(
        Case(
            "merge: missing folder", ["merge", str(root / "nope"), "--out", str(root / "merged-7")]
        )
    )
    # other commands
    out.append(Case("report: missing folder", ["report", str(root / "nope")]))
    out.append(Case("report: folder without results", ["report", str(root / "empty")]))
    out.append(
        Case(
            "report: corrupt sensitivity.csv",
            ["report", "{out}"],
            setup=lambda o: (o / "sensitivity.csv").write_text("a,b\n1\n2,3,4\n"),
        )
    )
    out.append(
        Case(
            "report: emptied sensitivity.csv",
            ["report", "{out}"],
            setup=lambda o: (o / "sensitivity.csv").write_text(""),
        )
    )
    out.append(Case("labels: missing model", ["labels", "--model", str(root / "nope")]))
    out.append(Case("labels: empty folder", ["labels", "--model", str(root / "empty")]))
    out.append(
        Case("labels: bad language", ["labels", "--model", str(x["model"]), "--language", "xx"])
    )
    out.append(Case("data inspect: missing file", ["data", "inspect", str(root / "nope.tsv")]))
    out.append(Case("data inspect: binary file", ["data", "inspect", str(x["data_bad"]["binary"])]))
    out.append(
        Case(
            "data inspect: bundled with --label-column",
            ["data", "inspect", "bundled", "--label-column", "x"],
        )
    )
    out.append(
        Case(
            "finetune: missing model",
            [
                "finetune",
                "--model",
                str(root / "nope"),
                "--data",
                str(x["data"]),
                "--out",
                str(root / "ft-1"),
                "--preset",
                "tiny",
            ],
        )
    )
    out.append(
        Case(
            "finetune: missing data",
            [
                "finetune",
                "--model",
                str(x["model"]),
                "--data",
                str(root / "nope.tsv"),
                "--out",
                str(root / "ft-2"),
                "--preset",
                "tiny",
            ],
        )
    )
    out.append(
        Case(
            "finetune: bogus preset",
            ["finetune", "--model", str(x["model"]), "--out", str(root / "ft-3"), "--preset", "x"],
        )
    )
    out.append(Case("no command", []))
    out.append(Case("unknown command", ["frobnicate"]))
    return out


def _other_corpus(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    target = path.parent / "data" / "other.jsonl"
    write_jsonl(target, rows[:-1])


def _empty_step_file(out: Path, name: str) -> None:
    (out / "steps" / "step-000000" / name).write_bytes(b"")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _stale_lock(out: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".emolens.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))


def _half_run(root: Path, model: Path) -> None:
    run = root / "run-half"
    if run.exists():
        return
    shutil.copytree(model, run / "checkpoint-2")
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "config.json").write_text("{}")
    (run / "emolens_run.json").write_text(json.dumps({"base_model": str(model)}))


def _edited_copy(out: Path, target: Path, what: str) -> None:
    shutil.copytree(out, target)
    manifest = json.loads((target / "manifest.json").read_text())
    if what == "settings":
        manifest["identity"]["settings"]["alphas"] = [0.0, 5.0]
    elif what == "model":
        manifest["identity"]["model"]["base"] = "/another/model"
    else:
        manifest["identity"]["data"] = "0" * 64
    (target / "manifest.json").write_text(json.dumps(manifest))


def content(path: Path):
    """A file's content: its bytes, or for safetensors its tensors and metadata (the header's
    metadata order is not fixed, so equal content can differ in bytes)."""
    if path.suffix == ".safetensors":
        try:
            tensors, meta = load_tensors(path)
            return (
                sorted(
                    (
                        k,
                        tuple(v.shape),
                        str(v.dtype),
                        v.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                    )
                    for k, v in tensors.items()
                ),
                sorted(meta.items(), key=str),
            )
        except Exception:  # noqa: BLE001 - damaged: compare the bytes
            pass
    return path.read_bytes()


def snapshot(folder: Path) -> dict:
    """Content of every step file and top-level table, and the manifest's identity."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file() and (
            rel.startswith("steps/step-") or ("/" not in rel and p.suffix == ".csv")
        ):
            snap[rel] = content(p)
    try:
        snap["manifest identity"] = json.dumps(
            json.loads((folder / "manifest.json").read_text())["identity"], sort_keys=True
        )
    except (OSError, ValueError, KeyError):
        snap["manifest identity"] = None
    return snap


def run_case(case: Case, pristine: Path, work: Path, verbose: bool) -> dict:
    out = work / ("fresh" if case.fresh else "out")
    if out.exists():
        shutil.rmtree(out)
    if case.fresh:
        out.mkdir(parents=True)
    else:
        shutil.copytree(pristine, out)
    reference = snapshot(pristine)
    if case.setup is not None:
        try:
            case.setup(out)
        except Exception as exc:  # noqa: BLE001 - e.g. an older emolens's manifest
            return {
                "case": case.name,
                "expect": "n/a",
                "exit": None,
                "traceback": False,
                "damaged": False,
                "clear": False,
                "wrong_exit_0": False,
                "ok_passed": False,
                "line": f"setup failed: {exc!r}",
                "n_error_lines": 0,
            }
    damaged_before = snapshot(out)  # what the case's own setup damaged is not the CLI's doing
    argv = [a.replace("{out}", str(out)) for a in case.argv]
    stderr, stdout = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()  # basicConfig binds sys.stderr: rebind it to the capture
    escaped = None
    lock_ctx = folder_lock(out, "another") if case.hold_lock else contextlib.nullcontext()
    started = time.time()
    with lock_ctx, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaped exception is what we count
            escaped = traceback.format_exc()
            code = None
    err = ANSI.sub("\n", stderr.getvalue())
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if re.match(
            r"(emolens|emolens \w+|emolens data \w+): "
            r"error:",
            line,
        )
    ]
    traceback_seen = escaped is not None or "Traceback (most recent call last)" in err
    after = snapshot(out) if case.uses_out and not case.fresh else reference
    if case.fresh:
        damaged = False
    elif case.expect == "ok":
        damaged = any(after.get(k) != v for k, v in reference.items())
    else:
        damaged = any(after.get(k) != damaged_before.get(k) for k in damaged_before)
    row = {
        "case": case.name,
        "expect": case.expect,
        "exit": code,
        "seconds": round(time.time() - started, 1),
        "traceback": traceback_seen,
        "damaged": damaged,
        "line": errors[-1] if errors else (lines[-1] if lines else ""),
        "n_error_lines": len(errors),
    }
    row["clear"] = code not in (0, None) and len(errors) == 1 and not traceback_seen
    row["wrong_exit_0"] = case.expect == "error" and code == 0
    row["ok_passed"] = case.expect == "ok" and code == 0 and not damaged and not traceback_seen
    if (
        verbose
        or traceback_seen
        or row["wrong_exit_0"]
        or damaged
        or (case.expect == "error" and not row["clear"])
        or (case.expect == "ok" and not row["ok_passed"])
    ):
        print(f"  [{case.name}] exit {code}: {row['line'][:200]}", file=sys.__stderr__)
        if escaped:
            print(escaped, file=sys.__stderr__)
    return row


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="run cases whose name has this text")
    parser.add_argument(
        "--skip",
        default=None,
        help="leave out cases whose name has one of these comma-separated texts "
        "(e.g. 'long': on an emolens that runs a 15k-token text, it needs "
        "tens of GB)",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--json", default=None, help="write every row to this file")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="emolens-bad-inputs-"))
    os.environ.setdefault("EMOLENS_CACHE", str(root / "cache"))
    x = build_inputs(root)
    x["model_copy"] = root / "model-copy"
    shutil.copytree(x["model"], x["model_copy"])
    pristine = root / "pristine"
    started = time.time()
    with contextlib.redirect_stderr(io.StringIO()):
        code = main([a.replace("{out}", str(pristine)) for a in analyze(x)])
    assert code == 0, "the reference analysis failed"
    print(f"reference analysis in {time.time() - started:.1f} s", file=sys.stderr)
    all_cases = [
        c
        for c in cases(x)
        if (args.only is None or args.only in c.name)
        and not any(part and part in c.name for part in (args.skip or "").split(","))
    ]
    rows = []
    for i, case in enumerate(all_cases):
        if args.verbose:
            print(f"-> {case.name}", file=sys.__stderr__, flush=True)
        rows.append(run_case(case, pristine, root / "work", args.verbose))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(all_cases)} cases", file=sys.stderr)
    errors = [r for r in rows if r["expect"] == "error"]
    oks = [r for r in rows if r["expect"] == "ok"]
    skipped = len(rows) - len(errors) - len(oks)
    rows = [r for r in rows if r["expect"] != "n/a"]
    table = [
        ("bad-input kinds tested", len(rows))
        if not skipped
        else ("bad-input kinds tested", f"{len(rows)} (+{skipped} whose setup failed)"),
        ("  expected to fail", len(errors)),
        ("  one clear line and exit non-zero", sum(r["clear"] for r in errors)),
        ("  tracebacks", sum(r["traceback"] for r in rows)),
        ("  exit 0 wrongly", sum(r["wrong_exit_0"] for r in rows)),
        ("  damaged earlier results", sum(r["damaged"] for r in rows)),
        ("faults to survive (exit 0, results intact)", len(oks)),
        ("  survived", sum(r["ok_passed"] for r in oks)),
    ]
    width = max(len(k) for k, _ in table)
    print("\n".join(f"{k:<{width}}  {v!s:>4}" for k, v in table))
    print(f"({time.time() - started:.0f} s; inputs in {root})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    bad = (
        sum(r["traceback"] or r["wrong_exit_0"] or r["damaged"] for r in rows)
        + sum(not r["clear"] for r in errors)
        + sum(not r["ok_passed"] for r in oks)
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_())
