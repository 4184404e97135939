"""Study files: `emolens run FILE` and `--config FILE` on each subcommand; the shipped
studies say what the demo and the paper run; the CLI imports nothing heavy."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from emolens.cli import finetune_config, main, parse_args

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_demo_study_is_what_emolens_demo_runs():
    from emolens.demo import DEMO_ANALYSIS, demo_settings
    from emolens.model.loading import DEFAULT_MODEL
    from emolens.run.config import AnalysisConfig
    from emolens.run.finetune import PRESETS

    study = str(STUDIES / "demo.toml")
    ft = parse_args(["finetune", "--config", study])
    preset, analysis = demo_settings(DEFAULT_MODEL)
    assert (ft.model, ft.preset, ft.data, ft.out) == (
        DEFAULT_MODEL,
        preset,
        "bundled",
        "emolens-demo/run",
    )
    assert finetune_config(ft) == PRESETS[preset]  # no setting but the preset's
    an = parse_args(["analyze", "--config", study])
    assert (an.model, an.out, an.split) == ("emolens-demo/run", "emolens-demo/results", "all")
    assert AnalysisConfig.from_cli(an) == analysis == DEMO_ANALYSIS
    assert parse_args(["report", "--config", study]).dir == "emolens-demo/results"
    assert parse_args(["demo", "--config", study]).out == "emolens-demo"


def test_paper_study_is_the_papers_protocol():
    from emolens.model.loading import SARASHINA_1B
    from emolens.run.config import AnalysisConfig
    from emolens.run.finetune import PRESETS

    study = str(STUDIES / "paper.toml")
    ft = parse_args(["finetune", "--config", study])
    assert ft.model == SARASHINA_1B and ft.preset == "paper" and ft.max_steps == 990
    config = finetune_config(ft)
    assert config == replace(PRESETS["paper"], max_steps=990)
    assert (config.batch_size, config.save_steps, config.split) == (16, 30, (0.8, 0.1, 0.1))
    an = parse_args(["analyze", "--config", study])
    assert (an.model, an.split, an.dtype) == ("runs/sarashina-paper/run", "test", "bfloat16")
    # the paper's settings are the defaults; the study names its prompt language, which
    # analyze checks against the prompt the run recorded (the default, None, reads it from there),
    # and asks for the probes' permutation p-values and refit intervals (costly, off by default)
    assert an.language == "ja"
    assert replace(AnalysisConfig.from_cli(an), language=None) == AnalysisConfig(
        probe_perms=19, probe_refits=20
    )


def test_flags_override_the_study_file(tmp_path):
    study = str(
        write(
            tmp_path,
            'out = "o"\nmodel = "m"\n[analyze]\nn_prompts = 4\nalphas = [0, 2.5]\nchat = true\n',
        )
    )
    args = parse_args(["analyze", "--config", study])
    assert (args.n_prompts, args.alphas, args.chat, args.model) == (4, "0,2.5", True, "m")
    args = parse_args(
        ["analyze", "--config", study, "--n-prompts", "7", "--model", "x", "--alphas", "1"]
    )
    assert (args.n_prompts, args.model, args.alphas) == (7, "x", "1")


@pytest.mark.parametrize(
    "text, names",
    [
        ("[analyze]\nn_promts = 3\n", ["n_promts", "n_prompts"]),
        ('modle = "x"\n', ["modle", "model"]),
        ("[analyse]\n", ["analyse", "[analyze]"]),
        ('[analyze]\nfilter_mode = "bogus"\n', ["filter_mode", "self"]),
        ('[analyze]\nn_prompts = "many"\n', ["n_prompts", "many"]),
        ('[analyze]\nchat = "yes"\n', ["chat", "true or false"]),
        ("[finetune\n", ["not valid TOML"]),
    ],
)
def test_a_bad_study_file_is_one_line_naming_the_key_and_the_valid_ones(
    tmp_path, capsys, text, names
):
    study = str(write(tmp_path, text))
    assert main(["analyze", "--config", study]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("emolens: error:")
    for name in names:
        assert name in err


def test_run_without_stages_is_an_error(tmp_path, capsys):
    assert main(["run", str(write(tmp_path, 'model = "m"\n'))]) == 1
    assert "nothing to run" in capsys.readouterr().err


def test_run_does_finetune_analyze_report_on_the_tiny_model(tmp_path):
    import emolens

    out = tmp_path / "study"
    study = write(
        tmp_path,
        f'''
out = "{out}"
model = "tiny-random"
device = "cpu"
[finetune]
preset = "tiny"
[analyze]
layers = "all"
steer_layers = "1,-1"
n_prompts = 2
alphas = [0, 4]
filter_mode = "none"
min_count = 1
batch_size = 32
n_boot = 20
[report]
''',
    )
    assert main(["run", str(study)]) == 0
    assert (out / "run" / "checkpoint-4").is_dir()
    assert (out / "results" / "report.html").is_file()
    results = emolens.Results(out / "results")
    assert results.steps_done == [0, 2, 4]
    assert set(results.sensitivity["layer"]) == {1, 3}
    assert sorted(set(results.sensitivity["alpha"])) == [0.0, 4.0]
    assert results.manifest["settings"]["n_prompts"] == 2


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_cli_and_its_help_import_no_torch():
    done = _python(
        "import sys, contextlib, io\n"
        "import emolens, emolens.cli, emolens.run.study\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    emolens.cli.main(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "emolens.Results  # the lazy names resolve\n"
        "print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("flags, level", [([], 30), (["-v"], 20), (["-vv"], 10)])
def test_verbose_sets_the_logging_level(flags, level):
    done = _python(
        "import logging\nfrom emolens.cli import main\n"
        f"assert main({flags!r} + ['data', 'inspect']) == 0\n"
        "print(logging.getLogger().level)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(level)
