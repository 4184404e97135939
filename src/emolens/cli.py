"""The ``emolens`` command: demo, finetune, analyze, report, export, labels, data inspect, run.

Importing this module imports no torch: each subcommand's options are built (and its modules
imported) only when that subcommand is used, so ``emolens --help`` answers at once.
"""

import argparse
import logging
import signal
import sys
import threading
import warnings


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """The ``emolens`` parser, with each subcommand's parser by name."""

    subcommands: dict[str, argparse.ArgumentParser]


def _model_options(p: argparse.ArgumentParser, default: str | None = "default") -> None:
    from emolens.model.loading import ALIASES, DEFAULT_MODEL

    default = DEFAULT_MODEL if default == "default" else default
    p.add_argument(
        "--model",
        default=default,
        required=default is None,
        help="model spec: alias (" + ", ".join(ALIASES) + "), .gguf file, HF folder, "
        "hub id, or a fine-tuning run folder (checkpoint series)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model of a run folder or LoRA adapter (if not recorded in it)",
    )
    _revision_option(p)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16; None means float32 on CPU, bfloat16 on GPU",
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="HF device_map (e.g. auto) for models larger than one GPU",
    )


def _revision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a hub id --model (the same as --model org/name@REVISION)",
    )


def _training_options(p: argparse.ArgumentParser) -> None:
    from emolens.model.loading import ALIASES, DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model to fine-tune: alias (" + ", ".join(ALIASES) + "), .gguf file, HF "
        "folder or hub id",
    )
    _revision_option(p)
    p.add_argument(
        "--device",
        default="auto",
        help="train on cuda, mps, cpu or auto (several GPUs: accelerate launch or torchrun)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="training precision: float32, or bfloat16/float16 mixed precision "
        "(weights and optimizer stay float32; checkpoints are saved in the preset's "
        "save_dtype); None means bfloat16 on a CUDA GPU that supports it, else float32",
    )


def _data_options(p: argparse.ArgumentParser, language: str | None = "ja") -> None:
    p.add_argument(
        "--data",
        default="bundled",
        help="corpus file (crowd-enVENT TSV/CSV, generic CSV/TSV/JSONL) or 'bundled' "
        "(the Japanese sample shipped with emolens; 'bundled:en' for English)",
    )
    p.add_argument("--text-column", default=None, help="text column (guessed if not given)")
    p.add_argument("--label-column", default=None, help="label column (guessed if not given)")
    when_absent = (
        "; when not given, that of the prompt the run was fine-tuned with "
        "(RUN/prompt.json), ja for a plain model"
    )
    p.add_argument(
        "--language",
        default=language,
        choices=["ja", "en"],
        help="prompt template language (ja is the paper's Figure 1 prompt) and the "
        "bundled corpus' language" + ("" if language else when_absent),
    )


def _load_corpus(args, language: str | None = None):
    from emolens.data.corpus import load_corpus, read_corpus

    if args.text_column or args.label_column:
        if args.data is None or str(args.data).split(":")[0] == "bundled":
            flags = " and ".join(
                f
                for f, v in (
                    ("--text-column", args.text_column),
                    ("--label-column", args.label_column),
                )
                if v
            )
            raise ValueError(
                f"{flags} name columns of a corpus file, but --data is "
                f"{args.data!r} (the bundled corpus, whose columns are fixed); "
                "drop them or give --data FILE"
            )
        return read_corpus(args.data, text_column=args.text_column, label_column=args.label_column)
    return load_corpus(args.data, language=args.language or language or "ja")


def _cmd_labels(args) -> int:
    from emolens.data.labels import PromptSpec
    from emolens.model.loading import load_tokenizer, resolve_model_dir

    source = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(source)
    prompt = PromptSpec.for_language(args.language, chat=args.chat)
    audit = prompt.label_tokens(tokenizer, allow_shared=args.allow_shared_tokens)
    print(f"label audit of {args.model} ({args.language} prompt):")
    print(audit.format_table())
    if args.json:
        from emolens.store.files import write_text

        write_text(args.json, audit.to_json())
        print(f"wrote {args.json}")
    return 0


def _cmd_data_inspect(args) -> int:
    from emolens.data.corpus import format_inspection, split_corpus

    corpus = _load_corpus(args)
    splits = split_corpus(corpus, seed=args.seed)
    print(f"{corpus.source}: {len(corpus)} samples, sha256 {corpus.sha256[:16]}")
    print(format_inspection(corpus, splits))
    return 0


def finetune_config(args):
    """The :class:`~emolens.run.finetune.FinetuneConfig` of parsed ``finetune`` arguments: the
    preset, with each field given as a flag (or in the study file) replaced."""
    from dataclasses import fields, replace

    from emolens.run.finetune import PRESETS, FinetuneConfig

    given = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if hasattr(args, f.name)}
    return replace(PRESETS[args.preset], **given)


def _cmd_finetune(args) -> int:
    from emolens.run.finetune import finetune, finetune_seeds

    config = finetune_config(args)
    seeds = getattr(args, "seeds", None)
    if seeds is not None and hasattr(args, "seed"):
        raise ValueError("give --seed (one run in --out) or --seeds (OUT/seed-<k>/), not both")
    corpus = _load_corpus(args)
    common = {"device": args.device, "dtype": args.dtype}
    if seeds is None:
        run = finetune(args.model, corpus, args.out, config, **common)
        print(f"run folder: {run}")
        return 0
    runs = finetune_seeds(args.model, corpus, args.out, config, seeds, **common)
    print(f"run folders ({len(runs)} seeds): " + ", ".join(str(r) for r in runs))
    return 0


def _analysis_config(args):
    from emolens.run.config import AnalysisConfig

    return AnalysisConfig.from_cli(args)


def _cmd_analyze(args) -> int:
    from emolens.run.analyze import analyze, failure_summary
    from emolens.run.prompt import prompt_language

    shard = None
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise ValueError(f"cannot read --shard {args.shard!r}: write i/n, e.g. 0/4") from None
        shard = (i, n)
    corpus = _load_corpus(args, prompt_language(args.model, args.language))
    if args.split != "all":
        from emolens.run.finetune import run_split

        corpus = run_split(args.model, corpus, args.split)
    from emolens.run.distributed import analyze_distributed, launched_ranks

    ranks = launched_ranks()  # under torchrun / accelerate launch: the ranks split the series
    result = (analyze if ranks is None else analyze_distributed)(
        args.model,
        corpus,
        args.out,
        _analysis_config(args),
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        shard=shard,
        override_prompt=args.override_prompt,
        overwrite=args.overwrite,
    )
    if ranks is not None and ranks[0] != 0:
        return 0 if failure_summary(result) is None else 1  # rank 0 speaks for the run
    return _finish(result, f"results in {result}")


def _finish(results_dir, message: str) -> int:
    """Print where the results are; exit 1 with one line if steps of the run failed."""
    from emolens.run.analyze import failure_summary

    summary = failure_summary(results_dir)
    if summary is None:
        print(message)
        return 0
    print(f"{message} (incomplete)")
    print(f"emolens: error: {summary}", file=sys.stderr)
    return 1


def _cmd_merge(args) -> int:
    from emolens.run.merge import merge

    print(f"merged into {merge(args.shards, args.out)}")
    return 0


def _cmd_report(args) -> int:
    from emolens.report.page import write_report

    path = write_report(args.dir)
    print(f"report: {path}")
    return 0


def _cmd_demo(args) -> int:
    from emolens.demo import run_demo

    path = run_demo(args.out, model=args.model, device=args.device)
    return _finish(path.parent, f"report: {path}")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study file (TOML): see studies/paper.toml and the README")
    p.set_defaults(func=_cmd_run)


def _demo_options(p: argparse.ArgumentParser) -> None:
    from emolens.model.loading import DEFAULT_MODEL

    p.add_argument("--out", default="emolens-demo", help="output folder")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="gemma-3-270m (default) or tiny-random (a one-minute run)",
    )
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(func=_cmd_demo)


def _setting_type(annotation):
    """The argparse ``type`` of a config field's annotation: int, float, str, a number that may
    be either (``float | int``: an int when written as one), a comma-separated tuple, and
    ``X | None`` (``none`` gives None). None for a bool (a switch)."""
    import types
    import typing

    if annotation is bool:
        return None
    origin, parts = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in parts if a is not type(None)]
        inner = _number if set(kinds) == {int, float} else _setting_type(kinds[0])
        if len(kinds) == len(parts):
            return inner
        return lambda text: None if text.strip().lower() == "none" else inner(text)
    if origin is tuple:
        element = _setting_type(parts[0])
        return lambda text: tuple(element(t.strip()) for t in text.split(",") if t.strip())
    return annotation


def _number(text: str) -> int | float:
    """An int when the text is one (``30`` steps), else a float (``0.03``: a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _config_options(
    p: argparse.ArgumentParser, config_type, presets: dict, skip: tuple[str, ...] = ()
) -> None:
    """One flag per field of the dataclass ``config_type`` (``--lora-r`` for ``lora_r``), from
    its type and ``metadata["help"]`` / ``["choices"]``: so a new field is a new flag (and a new
    study-file key). A flag not given leaves the preset's value (shown in the help)."""
    import dataclasses
    import typing

    for f in dataclasses.fields(config_type):
        if f.name in skip:
            continue
        values = {name: _shown(getattr(c, f.name)) for name, c in presets.items()}
        if len(set(values.values())) == 1:
            by_preset = next(iter(values.values()))
        else:
            by_preset = ", ".join(f"{name} {value}" for name, value in values.items())
        kwargs: dict = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata.get('help', f.name)} (preset: {by_preset})",
        }
        kind = _setting_type(f.type)
        if kind is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                optional = type(None) in typing.get_args(f.type)
                kwargs["choices"] = (*f.metadata["choices"], *([None] if optional else []))
                kwargs["metavar"] = "|".join(f.metadata["choices"]) + ("|none" if optional else "")
        p.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes integers like 0,1,2, not {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def _finetune_options(p: argparse.ArgumentParser) -> None:
    from emolens.run.finetune import PRESETS, FinetuneConfig

    _training_options(p)
    _data_options(p)  # --language (the prompt's and the bundled corpus')
    p.add_argument("--out", required=True, help="run folder (checkpoint-N/ go there)")
    p.add_argument(
        "--preset",
        default="demo",
        choices=list(PRESETS),
        help="training schedule the flags below override; 'paper' is 3 epochs, batch 16, "
        "80/10/10 split",
    )
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="several training seeds, e.g. 0,1,2: one run per seed in OUT/seed-<k>/, all on "
        "the split of --split-seed (if not given: the first seed); instead of --seed",
    )
    _config_options(p, FinetuneConfig, PRESETS, skip=("language",))
    p.set_defaults(func=_cmd_finetune)


def _analyze_options(p: argparse.ArgumentParser) -> None:
    _model_options(p, default=None)
    _data_options(p, language=None)
    p.add_argument("--out", required=True, help="results folder (re-running resumes)")
    from emolens.run.config import add_analysis_options

    add_analysis_options(p)
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "validation", "test"],
        help="analyse only this split of the run's data (as recorded by finetune)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="i/n: analyse every n-th checkpoint from the i-th (merge with 'emolens merge'); "
        "under torchrun or accelerate launch the ranks split the series by themselves",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results in --out that another model, data or settings made "
        "(without it such a re-run is refused)",
    )
    p.set_defaults(func=_cmd_analyze)


def _merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="+", help="result folders of analyze --shard i/n")
    p.add_argument("--out", required=True, help="merged results folder")
    p.set_defaults(func=_cmd_merge)


def _cmd_generate(args) -> int:
    from emolens.run.generation import generate
    from emolens.run.prompt import manifest_prompt
    from emolens.store.files import read_json

    manifest = read_json(f"{args.dir}/manifest.json")
    corpus = _load_corpus(args, manifest_prompt(manifest).template.language)
    table = generate(
        args.dir,
        corpus,
        alphas=args.alphas,
        layer=args.layer,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"{len(table)} continuations in {args.dir}/generations.csv")
    return 0


def _generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="results folder written by analyze")
    _data_options(p, language=None)
    p.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=None,
        help="steering strengths, in the analysis' alpha unit (default: its alpha grid); "
        "the unsteered continuation is always included",
    )
    p.add_argument(
        "--layer", type=int, default=-1, help="block whose output is steered (-1: the last)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per continuation")
    p.add_argument(
        "--steps", type=int, nargs="+", default=None, help="only these steps (default: all)"
    )
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16; None means float32 on CPU, bfloat16 on GPU",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="configurations generated at once per prompt"
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed before generating")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace generations made with other settings (without it they are kept and "
        "the run refused)",
    )
    p.set_defaults(func=_cmd_generate)


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="results folder written by analyze or demo")
    p.set_defaults(func=_cmd_report)


def _cmd_export(args) -> int:
    from emolens.interop import export_results

    files = export_results(
        args.results,
        args.format,
        args.out,
        step=args.step,
        layers=args.layers,
        emotions=args.emotions,
        scale=args.scale,
        model_type=args.model_type,
        overwrite=args.overwrite,
    )
    print(f"{len(files)} {args.format} files and export.json in {args.out}")
    return 0


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", metavar="RESULTS", help="results folder written by analyze or demo")
    p.add_argument(
        "--format",
        required=True,
        choices=["steering-vectors", "repeng-gguf"],
        help="steering-vectors: EMOTION.pt, SteeringVector(**torch.load(file)); repeng-gguf: "
        "EMOTION.gguf, a llama.cpp control vector (repeng's ControlVector.import_gguf)",
    )
    p.add_argument("--out", required=True, help="folder for the files (one per emotion)")
    p.add_argument(
        "--step", type=int, default=None, help="training step (default: the last finished)"
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="block outputs to export (negative: from the last block); default: every "
        "analysed layer (repeng-gguf: without 0, which llama.cpp never applies)",
    )
    p.add_argument("--emotions", nargs="+", default=None, help="only these emotions (default: all)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every vector by this")
    p.add_argument(
        "--model-type",
        default=None,
        help="GGUF model hint, the HF model_type (default: from the analysed architecture)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    p.set_defaults(func=_cmd_export)


def _labels_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--language", default="ja", choices=["ja", "en"], help="prompt language")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "--allow-shared-tokens", action="store_true", help="accept labels that share a first token"
    )
    p.add_argument("--json", default=None, help="also write the audit to this JSON file")
    p.set_defaults(func=_cmd_labels)


def _data_command_options(p: argparse.ArgumentParser) -> None:
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser(
        "inspect", formatter_class=_Formatter, help="rows per label and per split"
    )
    q.add_argument("data", nargs="?", default="bundled", help="corpus file or 'bundled'")
    q.add_argument("--text-column", default=None, help="text column (guessed if not given)")
    q.add_argument("--label-column", default=None, help="label column (guessed if not given)")
    q.add_argument("--language", default="ja", choices=["ja", "en"], help="bundled language")
    q.add_argument("--seed", type=int, default=0, help="split seed")
    q.set_defaults(func=_cmd_data_inspect)


#: Subcommands: name -> (help, option builder). Options are built only for the command used.
COMMANDS = {
    "demo": ("the whole study on the embedded default model, ending in a report", _demo_options),
    "run": ("a study file (TOML): finetune -> analyze -> report", _run_options),
    "finetune": ("fine-tune on emotion classification into a checkpoint series", _finetune_options),
    "analyze": (
        "vectors and steering sensitivity over a checkpoint series or a model",
        _analyze_options,
    ),
    "merge": ("combine the result folders of sharded analyze runs", _merge_options),
    "generate": (
        "steered greedy continuations of an analysis' neutral prompts, per step",
        _generate_options,
    ),
    "report": ("rebuild report.html from a results folder", _report_options),
    "export": (
        "concept vectors of one step to steering-vectors or llama.cpp (GGUF) files",
        _export_options,
    ),
    "labels": ("audit how each label tokenizes after the prompt", _labels_options),
    "data": ("corpus tools", _data_command_options),
}
#: Subcommands that take --config FILE (a study file's values become their defaults).
CONFIG_COMMANDS = ("demo", "finetune", "analyze", "merge", "report", "labels")


def build_parser(command: str | None = None, *, lazy: bool = False) -> _Parser:
    """The ``emolens`` parser. With ``lazy``, only ``command``'s options are built (the others
    are listed with their help): what :func:`main` does, so that nothing heavy is imported
    for a command not run."""
    from emolens import __version__

    parser = _Parser(
        prog="emolens",
        formatter_class=_Formatter,
        description="Emotion concept vectors, steering sensitivity and their fate under "
        "fine-tuning, on TransformerLens.",
    )
    parser.add_argument("--version", action="version", version=f"emolens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="progress logging: -v for INFO, -vv for DEBUG",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = {}
    for name, (help_text, add_options) in COMMANDS.items():
        p = sub.add_parser(name, formatter_class=_Formatter, help=help_text)
        parser.subcommands[name] = p
        if name in CONFIG_COMMANDS:
            p.add_argument(
                "--config",
                default=None,
                metavar="FILE",
                help="study file (TOML) whose values become this command's "
                "defaults; flags still override",
            )
        if not lazy or name == command:
            add_options(p)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """emolens' own warnings as one ``emolens: warning:`` line (no source line)."""
    if category.__module__.split(".")[0] == "emolens":
        from tqdm.auto import tqdm

        tqdm.write(f"emolens: warning: {message}", file=sys.stderr)  # above any progress bar
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` as :func:`main` does: only the named command's options are built, and its
    ``--config FILE`` values become the defaults."""
    command = _command_of(argv)
    parser = build_parser(command, lazy=True)
    sub = parser.subcommands.get(command) if command is not None else None
    if sub is not None and command in CONFIG_COMMANDS:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        config = pre.parse_known_args(argv[argv.index(command) + 1 :])[0].config
        if config:
            from emolens.run.study import apply_defaults, read_study, stage_values

            values = stage_values(
                read_study(config), command, accepted={a.dest for a in sub._actions}
            )
            apply_defaults(sub, values, f"{config} [{command}]")
    args = parser.parse_args(argv)
    if getattr(args, "revision", None):
        from emolens.model.loading import with_revision

        args.model = with_revision(args.model, args.revision)
    return args


def _cmd_run(args) -> int:
    from emolens.run.study import STAGES, StudyError, read_study

    study = read_study(args.study)
    stages = [s for s in STAGES if s in study]
    if not stages:
        raise StudyError(
            f"{args.study} has none of the tables "
            f"{', '.join(f'[{s}]' for s in STAGES)}: nothing to run"
        )
    for stage in stages:
        logging.getLogger(__name__).warning("emolens run: %s", stage)
        stage_args = parse_args([stage, "--config", args.study])
        code = stage_args.func(stage_args)
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except ValueError as exc:  # a study file that cannot be used
        print(f"emolens: error: {exc}", file=sys.stderr)
        return 2
    level = {0: logging.INFO if args.debug else logging.WARNING, 1: logging.INFO}
    logging.basicConfig(
        level=level.get(args.verbose, logging.DEBUG),
        format="emolens: %(message)s"
        if args.verbose < 2
        else "emolens: %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        warnings.showwarning = _show_warning
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: object) -> None:
        # recorded as well as raised: a KeyboardInterrupt raised inside a finaliser (__del__)
        # is printed and dropped by Python, and the run would then end as if never stopped
        interrupted.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if main_thread else None
    try:
        code = args.func(args)
        if interrupted:
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        print(
            "emolens: interrupted; finished work is saved, run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # one readable line unless --debug
        if args.debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"emolens: error: {text}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
