"""Fine-tune Sarashina on crowd-enVENT (Japanese) with the paper's schedule.

3 epochs, 80/10/10 split, batch 16 (990 steps on the 6,600 generation texts), a checkpoint and
a validation loss every 30 steps, then test accuracy per checkpoint (``RUN/accuracy.csv``).
Runs unchanged on one GPU, under ``accelerate launch`` or ``torchrun`` (the batch size is per
device: on N GPUs pass ``--batch-size $((16 / N))`` to keep the paper's 16)::

    python experiments/finetune_paper.py --data crowd-enVent_generation_ja.tsv --out runs/paper
    accelerate launch experiments/finetune_paper.py --data ... --out runs/paper --batch-size 8

Rerunning the same command continues an interrupted run from its last checkpoint.
"""

import logging
from dataclasses import replace

import _args  # experiments/_args.py: the shared argument shape

from emolens.data.corpus import load_corpus
from emolens.model.loading import SARASHINA_1B
from emolens.run.finetune import METHODS, PRESETS, finetune


def main(argv=None) -> None:
    parser = _args.parser(__doc__)
    parser.add_argument("--model", default=SARASHINA_1B, help="model spec (default: %(default)s)")
    parser.add_argument(
        "--data", required=True, help="corpus file (crowd-enVENT in Japanese), or 'bundled'"
    )
    parser.add_argument("--out", required=True, help="run folder (checkpoint-N/ go here)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--method", choices=METHODS, help="override the preset's method")
    parser.add_argument("--learning-rate", type=float, help="override the preset's (2e-5)")
    parser.add_argument("--batch-size", type=int, help="per-device batch size")
    parser.add_argument(
        "--save-optimizer",
        action="store_true",
        help="keep optimizer state in checkpoints (exact resume, ~3x the disk)",
    )
    parser.add_argument("--no-accuracy", action="store_true", help="skip RUN/accuracy.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = PRESETS[args.preset]
    overrides = {
        "method": args.method,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "save_optimizer": args.save_optimizer or None,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    run = finetune(
        args.model, load_corpus(args.data), args.out, config, accuracy=not args.no_accuracy
    )
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
