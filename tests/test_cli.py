"""The emolens command: help, errors, and runs that are killed and resumed."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from emolens.cli import build_parser, main
from emolens.data.corpus import load_corpus

COMMANDS = ["demo", "finetune", "analyze", "report", "labels", "merge"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_lists_its_options_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    for action in options:
        assert all(flag in text for flag in action.option_strings)
    flat = " ".join(text.split())
    # finetune's config flags say the presets' values instead: (preset: ...)
    assert flat.count("(default:") + flat.count("(preset:") == len(options)


def test_an_interrupt_dropped_inside_a_finaliser_still_exits_130(monkeypatch, capsys):
    """Python prints and drops a KeyboardInterrupt raised in ``__del__``; a Ctrl-C that lands
    there must still stop the command with 130, not let it end as if never interrupted."""
    import argparse

    import emolens.cli as cli

    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs here, inside __del__
                pass

    def command(args):
        Finaliser()  # collected at once
        return 0

    args = argparse.Namespace(func=command, debug=False, verbose=0)
    monkeypatch.setattr(cli, "parse_args", lambda argv: args)
    before = signal.getsignal(signal.SIGINT)
    assert main(["analyze"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_errors_are_one_readable_line_and_exit_non_zero(capsys, tmp_path):
    code = main(["labels", "--model", str(tmp_path / "missing-model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("emolens: error:")
    assert "does not exist" in err[0]


def test_debug_shows_the_traceback(tmp_path):
    from emolens.model.loading import ModelLoadError

    with pytest.raises(ModelLoadError):
        main(["--debug", "labels", "--model", str(tmp_path / "missing-model")])


def test_data_inspect_prints_rows_per_label_and_split(capsys):
    assert main(["data", "inspect"]) == 0
    out = capsys.readouterr().out
    assert "喜び" in out and "joy" in out and "train" in out


def test_labels_audit_prints_and_writes_json(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "audit.json"
    assert main(["labels", "--model", str(tiny_model_dir), "--json", str(target)]) == 0
    assert "罪悪感" in capsys.readouterr().out and target.exists()


def _write_corpus(path: Path) -> Path:
    corpus = load_corpus(None).head_per_label(6)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", "emotion", "generated_text"])
        for s in corpus.samples:
            writer.writerow([s.id, s.label, s.text])
    return path


def _analyze_cmd(run: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "emolens.cli",
        "analyze",
        "--model",
        str(run),
        "--data",
        str(data),
        "--out",
        str(out),
        "--layers",
        "1,-1",
        "--steer-layers",
        "1,-1",
        "--alphas",
        "0,2,4",
        "--n-prompts",
        "3",
        "--min-count",
        "1",
        "--batch-size",
        "16",
        "--filter-mode",
        "none",
        "--device",
        "cpu",
    ]


def _wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen, timeout: float = 600):
    start = time.time()
    while time.time() - start < timeout:
        if list(path_glob.glob(pattern)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {pattern} appeared: {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"{pattern} did not appear in {timeout} s")


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def uninterrupted(fake_run_dir, tmp_path_factory):
    """The corpus file and the results of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = _write_corpus(folder / "corpus.tsv")
    started = time.time()
    subprocess.run(
        _analyze_cmd(fake_run_dir, data, folder / "out"), check=True, env=ENV, capture_output=True
    )
    _DURATION["uninterrupted"] = time.time() - started
    return data, folder / "out"


_DURATION: dict[str, float] = {}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_analysis_resumes_to_identical_results(sig, fake_run_dir, uninterrupted, tmp_path):
    data, reference = uninterrupted
    env = ENV
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _analyze_cmd(fake_run_dir, data, out),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(out, "steps/step-*/done.json", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    # committed steps only: pathlib's "*" also matches a hidden .step-*.staging folder that
    # the signal cut short, which the resume rightly discards
    finished = {p: p.stat().st_mtime_ns for p in out.glob("steps/step-*/sensitivity.csv")}
    assert finished and not list(out.glob("**/.*.tmp*"))
    subprocess.run(_analyze_cmd(fake_run_dir, data, out), check=True, env=env, capture_output=True)
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    for name in ("sensitivity", "filtering", "steps", "attribution", "transfer", "dla"):
        assert (out / f"{name}.csv").read_bytes() == (reference / f"{name}.csv").read_bytes()
    assert sorted(pd.read_csv(out / "steps.csv").step) == [0, 2, 4]


def test_three_kills_at_random_moments_resume_to_identical_csv_files(
    fake_run_dir, uninterrupted, tmp_path
):
    """SIGKILL at three random moments of a run (each resumed from the last), then finish:
    every CSV equals the uninterrupted run's, and no staging or lock is left behind."""
    import random

    data, reference = uninterrupted
    out = tmp_path / "killed"
    seed = int(time.time())
    rng = random.Random(seed)
    moments = []
    for _ in range(3):
        moment = rng.uniform(0.15, 0.85) * _DURATION["uninterrupted"]
        proc = subprocess.Popen(
            _analyze_cmd(fake_run_dir, data, out),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        moments.append((round(moment, 2), proc.returncode))
    done = subprocess.run(_analyze_cmd(fake_run_dir, data, out), env=ENV, capture_output=True)
    assert done.returncode == 0, (seed, moments, done.stderr[-2000:])
    assert any(code == -signal.SIGKILL for _, code in moments), (seed, moments)
    for csv_file in sorted(reference.glob("*.csv")):
        assert (out / csv_file.name).read_bytes() == csv_file.read_bytes(), (
            seed,
            moments,
            csv_file.name,
        )
    assert not list(out.glob("steps/.*")) and not (out / "failed").exists()
    assert not (out / ".emolens.lock").read_text().strip()
