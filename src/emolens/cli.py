"""The ``emolens`` command: demo, finetune, analyze, report, labels, data inspect."""

import argparse
import logging
import sys
import warnings

from emolens.models import ALIASES, DEFAULT_MODEL


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _model_options(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="model spec: alias (" + ", ".join(ALIASES) + "), .gguf file, HF folder, "
                   "hub id, or a fine-tuning run folder (checkpoint series)")
    p.add_argument("--base", default=None,
                   help="base model of a run folder or LoRA adapter (if not recorded in it)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16; None means float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device-map", default=None,
                   help="HF device_map (e.g. auto) for models larger than one GPU")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="bundled",
                   help="corpus file (crowd-enVENT TSV/CSV, generic CSV/TSV/JSONL) or 'bundled' "
                   "(the Japanese sample shipped with emolens; 'bundled:en' for English)")
    p.add_argument("--text-column", default=None, help="text column (guessed if not given)")
    p.add_argument("--label-column", default=None, help="label column (guessed if not given)")
    p.add_argument("--language", default="ja", choices=["ja", "en"],
                   help="prompt template language (ja is the paper's Figure 1 prompt)")


def _load_corpus(args):
    from emolens.data import load_corpus, read_corpus

    if args.text_column or args.label_column:
        if args.data is None or str(args.data).split(":")[0] == "bundled":
            flags = " and ".join(f for f, v in (("--text-column", args.text_column),
                                                ("--label-column", args.label_column)) if v)
            raise ValueError(f"{flags} name columns of a corpus file, but --data is "
                             f"{args.data!r} (the bundled corpus, whose columns are fixed); "
                             "drop them or give --data FILE")
        return read_corpus(args.data, text_column=args.text_column,
                           label_column=args.label_column)
    return load_corpus(args.data, language=args.language)


def _cmd_labels(args) -> int:
    from emolens.labels import TEMPLATES, resolve_label_tokens
    from emolens.models import load_tokenizer, resolve_model_dir

    source = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(source)
    audit = resolve_label_tokens(tokenizer, TEMPLATES[args.language], chat=args.chat,
                                 allow_shared=args.allow_shared_tokens)
    print(f"label audit of {args.model} ({args.language} prompt):")
    print(audit.format_table())
    if args.json:
        from emolens.results import write_text

        write_text(args.json, audit.to_json())
        print(f"wrote {args.json}")
    return 0


def _cmd_data_inspect(args) -> int:
    from emolens.data import format_inspection, split_corpus

    corpus = _load_corpus(args)
    splits = split_corpus(corpus, seed=args.seed)
    print(f"{corpus.source}: {len(corpus)} samples, sha256 {corpus.sha256[:16]}")
    print(format_inspection(corpus, splits))
    return 0


def _cmd_finetune(args) -> int:
    from dataclasses import replace

    from emolens.finetune import PRESETS, finetune

    config = PRESETS[args.preset]
    overrides = {k: v for k, v in {"method": args.method, "max_steps": args.max_steps,
                                   "save_steps": args.save_steps, "seed": args.seed,
                                   "learning_rate": args.learning_rate}.items() if v is not None}
    config = replace(config, **overrides)
    run = finetune(args.model, _load_corpus(args), args.out, config)
    print(f"run folder: {run}")
    return 0


def _analysis_config(args):
    from emolens.pipeline import AnalysisConfig

    return AnalysisConfig.from_cli(args)


def _cmd_analyze(args) -> int:
    from emolens.pipeline import analyze

    shard = None
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise ValueError(f"cannot read --shard {args.shard!r}: write i/n, e.g. 0/4") from None
        shard = (i, n)
    corpus = _load_corpus(args)
    if args.split != "all":
        from emolens.finetune import run_split

        corpus = run_split(args.model, corpus, args.split)
    result = analyze(args.model, corpus, args.out, _analysis_config(args),
                     base=args.base, device=args.device, dtype=args.dtype,
                     device_map=args.device_map, shard=shard, overwrite=args.overwrite)
    return _finish(result, f"results in {result}")


def _finish(results_dir, message: str) -> int:
    """Print where the results are; exit 1 with one line if steps of the run failed."""
    from emolens.pipeline import failure_summary

    summary = failure_summary(results_dir)
    if summary is None:
        print(message)
        return 0
    print(f"{message} (incomplete)")
    print(f"emolens: error: {summary}", file=sys.stderr)
    return 1


def _cmd_merge(args) -> int:
    from emolens.pipeline import merge

    print(f"merged into {merge(args.shards, args.out)}")
    return 0


def _cmd_report(args) -> int:
    from emolens.report import write_report

    path = write_report(args.dir)
    print(f"report: {path}")
    return 0


def _cmd_demo(args) -> int:
    from emolens.demo import run_demo

    path = run_demo(args.out, model=args.model, device=args.device)
    return _finish(path.parent, f"report: {path}")


def build_parser() -> argparse.ArgumentParser:
    from emolens import __version__

    parser = argparse.ArgumentParser(
        prog="emolens", formatter_class=_Formatter,
        description="Emotion concept vectors, steering sensitivity and their fate under "
        "fine-tuning, on TransformerLens.")
    parser.add_argument("--version", action="version", version=f"emolens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help="the whole study on the embedded default model, ending in a report")
    p.add_argument("--out", default="emolens-demo", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="gemma-3-270m (default) or tiny-random (a one-minute run)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("finetune", formatter_class=_Formatter,
                       help="fine-tune on emotion classification into a checkpoint series")
    _model_options(p)
    _data_options(p)
    p.add_argument("--out", required=True, help="run folder (checkpoint-N/ go there)")
    p.add_argument("--preset", default="demo", choices=["paper", "demo", "tiny"],
                   help="training schedule; 'paper' is 3 epochs, batch 16, 80/10/10 split")
    p.add_argument("--method", default=None, choices=["full", "full-frozen-embeddings", "lora"],
                   help="override the preset's method")
    p.add_argument("--max-steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--learning-rate", type=float, default=None, help="override the preset's")
    p.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("analyze", formatter_class=_Formatter,
                       help="vectors and steering sensitivity over a checkpoint series or a model")
    _model_options(p, default=None)
    _data_options(p)
    p.add_argument("--out", required=True, help="results folder (re-running resumes)")
    from emolens.pipeline import add_analysis_options

    add_analysis_options(p)
    p.add_argument("--split", default="all", choices=["all", "train", "validation", "test"],
                   help="analyse only this split of the run's data (as recorded by finetune)")
    p.add_argument("--shard", default=None,
                   help="i/n: analyse every n-th checkpoint from the i-th (merge with "
                   "'emolens merge')")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results in --out that another model, data or settings made "
                   "(without it such a re-run is refused)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("merge", formatter_class=_Formatter,
                       help="combine the result folders of sharded analyze runs")
    p.add_argument("shards", nargs="+", help="result folders of analyze --shard i/n")
    p.add_argument("--out", required=True, help="merged results folder")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("report", formatter_class=_Formatter,
                       help="rebuild report.html from a results folder")
    p.add_argument("dir", help="results folder written by analyze or demo")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("labels", formatter_class=_Formatter,
                       help="audit how each label tokenizes after the prompt")
    _model_options(p)
    p.add_argument("--language", default="ja", choices=["ja", "en"], help="prompt language")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--allow-shared-tokens", action="store_true",
                   help="accept labels that share a first token")
    p.add_argument("--json", default=None, help="also write the audit to this JSON file")
    p.set_defaults(func=_cmd_labels)

    p = sub.add_parser("data", formatter_class=_Formatter, help="corpus tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser("inspect", formatter_class=_Formatter,
                            help="rows per label and per split")
    q.add_argument("data", nargs="?", default="bundled", help="corpus file or 'bundled'")
    q.add_argument("--text-column", default=None, help="text column (guessed if not given)")
    q.add_argument("--label-column", default=None, help="label column (guessed if not given)")
    q.add_argument("--language", default="ja", choices=["ja", "en"], help="bundled language")
    q.add_argument("--seed", type=int, default=0, help="split seed")
    q.set_defaults(func=_cmd_data_inspect)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """emolens' own warnings as one ``emolens: warning:`` line (no source line)."""
    if category.__module__.split(".")[0] == "emolens":
        from tqdm.auto import tqdm

        tqdm.write(f"emolens: warning: {message}", file=sys.stderr)  # above any progress bar
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="emolens: %(message)s")
    if not args.debug:
        warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("emolens: interrupted; finished work is saved, run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:  # one readable line unless --debug
        if args.debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"emolens: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

