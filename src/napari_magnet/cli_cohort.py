"""The cohort verbs of the ``napari-magnet`` command on dask.distributed.

``napari-magnet batch CSV --model M --out DIR [--scheduler ADDR] [--workers N]`` and
``napari-magnet patch ... --scheduler/--workers``: their options and what they run
(:mod:`napari_magnet.engine.cohort_run`). Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = [
    "add_batch_parser",
    "add_scheduler_options",
    "evaluate_on_cluster",
    "report_outcome",
    "run_tasks",
    "run_batch",
    "run_patch_cohort",
]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    """``--scheduler ADDR``, ``--workers N`` and ``--retries N`` on ``parser``."""
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDR",
        help="run one task per slide on this dask scheduler (tcp://host:8786); slides and "
        "--out must be at the same paths on every worker (shared storage)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes of a local dask cluster (default: one per GPU when CUDA is "
        "present, else one per CPU core)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times dask reruns a slide whose task raised (default 2)",
    )


def add_batch_parser(verbs, func) -> argparse.ArgumentParser:
    """The ``batch`` verb: headless magnify of every slide of a cohort CSV."""
    ba = verbs.add_parser(
        "batch",
        help="run a model on every slide of a cohort CSV (dask): an export folder per "
        "slide and summary.csv",
    )
    ba.add_argument("slides", metavar="CSV", help="cohort CSV (path,label,...)")
    ba.add_argument("--model", default="magnet3", help="a model name, demo or a checkpoint")
    ba.add_argument(
        "--out", required=True, help="folder of <slide stem>/ export folders and summary.csv"
    )
    ba.add_argument("--device", default="auto", help="auto (a GPU per worker), cpu or cuda")
    ba.add_argument("--rule", choices=("enough", "paper"), default="enough")
    ba.add_argument("--seed", type=int, default=0)
    ba.add_argument("--n-patches", type=_positive_int, default=None)
    ba.add_argument("--no-aux", action="store_true", help="skip auxiliary per-layer heads")
    ba.add_argument("--overwrite", action="store_true", help="redo complete export folders")
    add_scheduler_options(ba)
    ba.add_argument("--quiet", action="store_true")
    ba.set_defaults(func=func)
    return ba


def report_outcome(outcome, quiet: bool) -> None:
    """One line per slide as its outcome arrives (failures on stderr, always)."""
    if outcome.status == "failed":
        print(f"failed: {outcome.slide}: {outcome.error}", file=sys.stderr)
    elif not quiet:
        print(f"{outcome.status}: {outcome.output}", flush=True)


def run_tasks(
    args: argparse.Namespace, task, items: list[str], on_outcome=None, progress: bool = True
) -> list:
    """Run ``task`` on every item (slide or bag path) on the cluster the options name
    (``--scheduler`` or a ``LocalCluster`` of ``--workers``, default one per core or GPU):
    the outcomes, in the items' order; each reported as it arrives (``on_outcome``, default
    one line per item unless ``--quiet``), under a progress bar unless ``--quiet`` or
    ``progress`` is false."""
    from .engine.cohort_run import cohort_client, default_workers, run_cohort

    if on_outcome is None:

        def on_outcome(outcome) -> None:
            report_outcome(outcome, args.quiet)

    workers = args.workers or min(len(items), default_workers(task.gpu))
    with cohort_client(args.scheduler, workers, gpu=task.gpu) as client:
        return run_cohort(
            task,
            items,
            client,
            retries=args.retries,
            progress=progress and not args.quiet,
            on_outcome=on_outcome,
        )


def run_patch_cohort(args: argparse.Namespace, options) -> int:
    """``patch ... --scheduler/--workers``: one dask task per slide; exit 1 if any failed."""
    from .engine.cohort_run import counts
    from .engine.cohort_tasks import PatchTask

    task = PatchTask(str(Path(args.out).resolve()), options, args.overwrite)
    outcomes = run_tasks(args, task, [str(Path(s).resolve()) for s in args.slides])
    print(counts(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def run_batch(args: argparse.Namespace) -> int:
    """``batch CSV --model M --out DIR``: exit 1 if any slide failed."""
    from .engine.cohort import read_cohort
    from .engine.cohort_run import counts, write_summary
    from .engine.cohort_tasks import MagnifyTask

    records = read_cohort(args.slides, check_files=False, require_both_labels=False)
    out = Path(args.out).resolve()
    model = args.model
    if Path(model).exists():  # a checkpoint: the workers need its absolute path
        model = str(Path(model).resolve())
    task = MagnifyTask(
        str(out),
        model,
        args.device,
        args.rule,
        args.seed,
        args.n_patches,
        not args.no_aux,
        args.overwrite,
        gpu=args.device != "cpu",
    )
    outcomes = run_tasks(args, task, [str(r.path) for r in records])
    path = write_summary(out / "summary.csv", outcomes)
    print(f"{counts(outcomes)}; summary in {path}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _evaluated(outcome, total: int, report) -> None:
    report_outcome(outcome, True)
    if report is not None:
        report(0, total, outcome.values.get("evaluation"))


def evaluate_on_cluster(args: argparse.Namespace, records, report=None) -> list:
    """``evaluate --scheduler/--workers``: one dask task per slide; the evaluation outcomes
    of the slides that worked, in the cohort's order. A slide that fails is reported on
    stderr and left out of the metrics; ``report(done, total, outcome)`` after each slide."""
    from .engine.cohort_tasks import EvaluateTask

    model = args.model
    if Path(model).exists():
        model = str(Path(model).resolve())
    task = EvaluateTask(
        tuple(records), model, args.device, args.rule, args.seed, gpu=args.device != "cpu"
    )
    slides = [str(r.path) for r in records]
    outcomes = run_tasks(
        args, task, slides, lambda o: _evaluated(o, len(slides), report), progress=False
    )
    return [o.values["evaluation"] for o in outcomes if o.status != "failed"]
