"""The ``napari-magnet embed`` verb: its arguments and what it runs (called from ``cli.py``).

Heavy imports (torch) happen when the verb runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def cmd_embed(args: argparse.Namespace) -> int:
    """``napari-magnet embed --patches DIR --encoder NAME --out DIR``: features of every
    magnification of every bag file in ``--patches`` (written into ``--out/<name>.h5``);
    a bag holding features of the same configuration is skipped, one that fails is reported
    with its reason and the others go on (exit status 1 if any failed)."""
    import warnings

    import torch
    from tqdm import tqdm

    from ..models.registry import resolve_device
    from .embedding import embed_bags, summary
    from .encoders import RandomFeaturesWarning, build_encoder

    patches = Path(args.patches)
    if not patches.is_dir():
        raise ValueError(f"--patches {patches} is not a folder")
    bags = sorted(p for p in patches.glob("*.h5") if not p.name.startswith("."))
    if not bags:
        raise ValueError(f"no bag files (*.h5) in {patches}")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomFeaturesWarning)
        encoder = build_encoder(args.encoder, args.weights, device="cpu", seed=args.seed)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.scheduler or args.workers:
        return _embed_on_cluster(args, bags)
    encoder.module.to(device)
    bar = tqdm(total=len(bags), unit="bag", disable=args.quiet)

    def report(outcome) -> None:
        bar.update(1)
        if outcome.status == "failed":
            bar.write(f"failed: {outcome.bag}: {outcome.reason}", file=sys.stderr)
        elif not args.quiet:
            bar.write(f"{outcome.status}: {outcome.output} ({outcome.patches} patches)")

    outcomes = embed_bags(
        bags,
        args.out,
        encoder,
        progress=report,
        device=device,
        batch_size=args.batch_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
        slides_dir=args.slides,
        workers=args.read_threads,
    )
    bar.close()
    print(summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _embed_on_cluster(args: argparse.Namespace, bags: list[Path]) -> int:
    """``embed --scheduler/--workers``: one dask task per bag file; exit 1 if any failed."""
    from ..cli_cohort import run_tasks
    from ..engine.cohort_run import counts
    from ..engine.cohort_tasks import EmbedTask

    weights = None if args.weights is None else str(Path(args.weights).resolve())
    task = EmbedTask(
        str(Path(args.out).resolve()),
        args.encoder,
        weights,
        args.device,
        args.batch_size,
        args.dtype,
        None if args.slides is None else str(Path(args.slides).resolve()),
        args.seed,
        args.overwrite,
        gpu=args.device != "cpu",
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    outcomes = run_tasks(args, task, [str(p.resolve()) for p in bags])
    print(counts(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def add_embed_parser(verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``embed`` verb to the command's sub-parsers."""
    from ..cli_cohort import add_scheduler_options

    em = verbs.add_parser("embed", help="patch embeddings of bag files (features per mpp)")
    em.add_argument("--patches", required=True, help="folder of bag files (napari-magnet patch)")
    em.add_argument(
        "--encoder",
        required=True,
        help="resnet50-trunc (1024-d, CLAM/ZoomMIL), torchvision:<name> or timm:<name>",
    )
    em.add_argument(
        "--weights", help="the encoder's weights (safetensors or torch state dict); none: random"
    )
    em.add_argument("--out", required=True, help="folder of the bag files with features")
    em.add_argument("--slides", help="folder of the slides (default: beside the bag files)")
    em.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    em.add_argument("--batch-size", type=_positive_int, default=64)
    em.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    em.add_argument("--read-threads", type=_positive_int, help="reading threads (CPU count, ≤ 8)")
    em.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    em.add_argument("--seed", type=int, default=0, help="initialisation seed without weights")
    em.add_argument("--overwrite", action="store_true", help="embed bags with features too")
    em.add_argument("--quiet", action="store_true")
    add_scheduler_options(em)
    em.set_defaults(func=cmd_embed)
    return em
