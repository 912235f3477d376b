"""The ``napari-magnet`` command: demo, view, info, synth, models, magnify, train, evaluate,
patch, embed, batch.

Heavy imports (torch, napari) happen inside the verbs that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .cli_cohort import add_batch_parser, add_scheduler_options


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _box(text: str) -> tuple[float, float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("box must be x0,y0,x1,y1 in level-0 pixels")
    return tuple(parts)  # type: ignore[return-value]


def cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    with open_slide(args.slide) as slide:
        meta = slide.metadata()
        meta.pop("properties")
        print(json.dumps(meta, indent=2, default=str, ensure_ascii=False))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .synth import SyntheticSlideSpec, generate_cohort, generate_slide

    out = Path(args.out)
    bar = tqdm(unit="tile" if args.n == 1 else "slide", disable=args.quiet)

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        if args.n == 1 and out.suffix.lower() in (".tif", ".tiff"):
            spec = SyntheticSlideSpec(
                width=args.width,
                height=args.height,
                mpp=args.mpp,
                seed=args.seed,
                label=args.label,
                lesion_kind=args.lesion,
            )
            info = generate_slide(out, spec, progress=report)
            bar.close()
            print(
                f"wrote {info.path} ({info.width} x {info.height} px, label {info.label}, "
                f"{info.lesion_kind}); ground truth in {info.sidecar}"
            )
        else:
            infos = generate_cohort(
                out,
                args.n,
                args.seed,
                args.width,
                args.height,
                args.mpp,
                progress=report,
                positives=args.positives,
                jobs=args.jobs,
            )
            bar.close()
            print(f"wrote {len(infos)} slides and {out / 'cohort.csv'}")
    except ValueError as error:
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_magnify(args: argparse.Namespace) -> int:
    from .engine.magnify import magnify
    from .engine.types import MagnifyResult
    from .io.results import export_run
    from .models.registry import load_model
    from .slide import open_slide

    with open_slide(args.slide) as slide:
        model = load_model(args.model, device=args.device)
        steps = []
        result = None
        for item in magnify(
            slide,
            model,
            device=args.device,
            box=args.box,
            rule=args.rule,
            n_patches=args.n_patches,
            seed=args.seed,
            aux_heads=not args.no_aux,
        ):
            if isinstance(item, MagnifyResult):
                result = item
            else:
                steps.append(item)
                print(f"layer {item.layer}: {len(item.region_ids)} regions", flush=True)
        paths = export_run(args.out, slide.requested_path, slide.mpp, steps, result)
    print(
        f"probability {result.probability:.3f} (label {result.label}); "
        f"{result.pixels_processed:,} values processed, {result.pixels_read:,} read; "
        f"{result.seconds:.2f} s"
    )
    print(f"wrote {len(paths)} files into {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.family import families
    from .models.registry import family_of_spec, shipped_checkpoints

    for family in families():
        trainable = "trainable" if family.training_task is not None else "inference only"
        print(f"{family.architecture}: {family.description} ({trainable})")
        for name in family.configs:
            print(f"  {name}")
    for name, path in shipped_checkpoints().items():
        family = family_of_spec(name)
        kind = f"a trained {family.architecture} model, " if family is not None else ""
        print(f"{name}: {kind}the shipped checkpoint {path}")
    return 0


def _classes(text: str) -> tuple[str, ...]:
    return tuple(c.strip().lower() for c in text.split(",") if c.strip())


def _family_train_options() -> list:
    """Every registered family's training options, each name once (first family wins)."""
    from .models.family import families

    seen: dict[str, object] = {}
    for family in families():
        for option in family.train_options:
            seen.setdefault(option.name, option)
    return list(seen.values())


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.training import TrainOptions, train

    options = TrainOptions(
        slides=args.slides,
        out=args.out,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        resume=args.resume,
        val_fraction=args.val_fraction,
        seed=args.seed,
        family_options={
            option.name: getattr(args, option.name)
            for option in _family_train_options()
            if getattr(args, option.name) is not None
        },
        augment=not args.no_augment,
        exclude_classes=args.exclude_classes,
        workers=args.workers,
        rule=args.rule,
        progress=not args.quiet,
    )
    try:
        result = train(options)
    except KeyboardInterrupt:
        print(
            f"interrupted; completed epochs are saved in {args.out}: continue with "
            f"--resume {args.out}",
            file=sys.stderr,
        )
        return 130
    best = result.best_metric
    auroc = best.get("val_auroc")
    print(
        f"{result.epochs_done} epoch(s) done; best epoch {result.best_epoch}"
        + (
            f" (validation AUROC {auroc:.3f}, accuracy {best.get('val_accuracy'):.3f})"
            if auroc is not None
            else ""
        )
    )
    print(
        f"best model: {result.best_checkpoint}; metrics: {result.metrics_csv}; "
        f"curve: {result.curve_png}; resume with --resume {args.out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine.cohort import read_cohort
    from .engine.evaluation import evaluate_cohort, markdown_table, summarize, write_report
    from .models.registry import load_model

    records = read_cohort(args.slides, exclude_classes=args.exclude_classes)
    model = load_model(args.model, device=args.device)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="slide", file=sys.stderr, disable=None)

    def report(done: int, total: int, outcome) -> None:
        if bar is not None:
            bar.update(1)

    if args.scheduler or args.workers:
        from .cli_cohort import evaluate_on_cluster

        outcomes = evaluate_on_cluster(args, records, report)
    else:
        outcomes = evaluate_cohort(
            records, model, device=args.device, rule=args.rule, seed=args.seed, progress=report
        )
    if bar is not None:
        bar.close()
    rows = summarize(outcomes)
    title = f"{getattr(model, 'model_name', args.model)} on {args.slides} ({len(outcomes)} slides)"
    print(markdown_table(rows, title=title), end="")
    if args.out:
        meta = {
            "model": str(args.model),
            "checkpoint_sha256": getattr(model, "checkpoint_sha256", ""),
            "cohort": str(args.slides),
            "slides": len(outcomes),
            "rule": args.rule,
            "device": str(args.device),
            "seed": args.seed,
        }
        path = write_report(args.out, rows, outcomes, meta)
        print(f"wrote {path}")
    return 0


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_demo(args: argparse.Namespace) -> int:
    if not _has_display() and not args.headless:
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            print(
                "error: no display and no xvfb-run; install Xvfb (make demo does) or run "
                "with a display",
                file=sys.stderr,
            )
            return 2
        command = [
            xvfb,
            "-a",
            "-s",
            "-screen 0 1600x1000x24",
            sys.executable,
            "-m",
            "napari_magnet.cli",
            "demo",
            "--headless",
            "--out",
            str(args.out),
        ]
        if args.model:
            command += ["--model", args.model]
        return subprocess.call(command)
    from ._napari.demo import run_demo

    return run_demo(headless=args.headless, out_dir=Path(args.out), model=args.model)


def cmd_view(args: argparse.Namespace) -> int:
    """``napari-magnet view SLIDE...``: napari with the slides opened by our reader and the
    Magnify widget docked, whatever reader napari's settings prefer."""
    from ._napari.open_routes import check_slides

    paths = check_slides(args.slides)  # before Qt starts: a bad path is a plain error
    if sys.platform.startswith("linux") and not _has_display():
        print("error: no display: `napari-magnet view` opens a window", file=sys.stderr)
        return 2
    import napari

    from ._napari.view import view_slides

    view_slides(paths)
    napari.run()
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    """``napari-magnet patch SLIDES... --out DIR``: one bag file of nested tissue-patch grids
    per slide (``<stem>.h5``); a slide whose file exists and validates is skipped, one that
    fails is reported with its reason and the others go on (exit status 1 if any failed)."""
    from .bags.patching import PatchOptions, patch_slides, summary
    from .bags.tissue import TissueOptions

    given = {"white": args.white, "black": args.black, "grey_tolerance": args.grey_tolerance}
    given["min_fraction"] = args.tissue_threshold
    tissue = TissueOptions(**{k: v for k, v in given.items() if v is not None})
    options = PatchOptions(args.mpp, args.patch_size, tissue, args.slide_mpp)
    if args.scheduler or args.workers:
        from .cli_cohort import run_patch_cohort

        return run_patch_cohort(args, options)

    from tqdm import tqdm

    # one bar per cohort on a terminal; the per-slide lines go above it
    bar = tqdm(total=len(args.slides), unit="slide", file=sys.stderr, disable=None)

    def report(outcome) -> None:
        bar.update(1)
        if outcome.status == "failed":
            bar.write(f"failed: {outcome.slide}: {outcome.reason}", file=sys.stderr)
        elif not args.quiet:
            counts = " / ".join(str(n) for n in outcome.patches)
            bar.write(f"{outcome.status}: {outcome.output}" + (f" ({counts})" if counts else ""))

    try:
        outcomes = patch_slides(args.slides, args.out, options, args.overwrite, progress=report)
    finally:
        bar.close()
    print(summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def cmd_batch(args: argparse.Namespace) -> int:
    """``napari-magnet batch CSV --model M --out DIR``: headless magnify of every slide of a
    cohort on dask.distributed (see :mod:`napari_magnet.cli_cohort`)."""
    from .cli_cohort import run_batch

    return run_batch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-magnet", description="Magnifying networks for whole-slide images."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="open napari with the sample slide and Magnify")
    demo.add_argument("--out", default="demo-output", help="folder for the headless screenshot")
    demo.add_argument(
        "--model", default=None, help="model to run (default: demo, else magnet3-lite)"
    )
    demo.add_argument("--headless", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    view = verbs.add_parser(
        "view", help="open slides in napari with napari-magnet's reader and the Magnify widget"
    )
    view.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files or DICOM folders")
    view.set_defaults(func=cmd_view)

    info = verbs.add_parser("info", help="print a slide's geometry and metadata")
    info.add_argument("slide")
    info.set_defaults(func=cmd_info)

    synth = verbs.add_parser("synth", help="generate synthetic slides (one, or a cohort)")
    synth.add_argument(
        "--out", required=True, help="a .tif path for one slide, or a folder for a cohort"
    )
    synth.add_argument("--n", type=_positive_int, default=1, help="number of slides")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--width", type=_positive_int, default=16_384)
    synth.add_argument("--height", type=_positive_int, default=12_288)
    synth.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel")
    synth.add_argument("--label", type=int, choices=(0, 1), default=None)
    synth.add_argument("--lesion", choices=("macro", "micro", "itc", "negative"), default=None)
    synth.add_argument(
        "--positives",
        type=lambda v: [k for k in v.split(",") if k],
        default=None,
        metavar="CLASSES",
        help="cohort: tumour classes positives cycle through, comma-separated; "
        "repeat one to weight it (micro,micro,macro)",
    )
    synth.add_argument(
        "--jobs", type=_positive_int, default=1, help="cohort: slides generated at once (processes)"
    )
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=cmd_synth)

    models = verbs.add_parser("models", help="list the model families and their named models")
    models.set_defaults(func=cmd_models)

    mag = verbs.add_parser("magnify", help="run a model on a slide and export the results")
    mag.add_argument("slide")
    mag.add_argument(
        "--model",
        default="magnet3",
        help="a model name ('napari-magnet models' lists them), demo, or a checkpoint path",
    )
    mag.add_argument("--out", required=True, help="output folder")
    mag.add_argument("--device", default="auto", help="auto, cpu or cuda")
    mag.add_argument("--box", type=_box, default=None, help="x0,y0,x1,y1 level-0 box")
    mag.add_argument("--rule", choices=("enough", "paper"), default="enough")
    mag.add_argument(
        "--n-patches",
        type=_positive_int,
        default=None,
        help="patches drawn, for models whose patches are adjustable",
    )
    mag.add_argument("--seed", type=int, default=0)
    mag.add_argument(
        "--no-aux",
        action="store_true",
        help="skip auxiliary per-layer predictions where a model has them (faster)",
    )
    mag.set_defaults(func=cmd_magnify)

    tr = verbs.add_parser("train", help="train a model on a cohort CSV of slides")
    tr.add_argument(
        "--slides",
        required=True,
        help="cohort CSV: path,label[,lesion_class,"
        "lesion_boxes] (see README, 'Training on your own slides')",
    )
    tr.add_argument(
        "--model",
        default=None,
        help="a model name ('napari-magnet models' lists them; required unless resuming)",
    )
    tr.add_argument("--epochs", type=_positive_int, default=10, help="total epochs of the run")
    tr.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="slides per step (default: the model family's, e.g. 16 for magnet3)",
    )
    tr.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: the model family's, e.g. 3e-5 for MagNet as in the paper)",
    )
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--out", required=True, help="run folder (checkpoints, metrics, curve)")
    tr.add_argument(
        "--resume",
        default=None,
        help="a run folder (or its train_state.json) "
        "to continue, or a model checkpoint to start from",
    )
    tr.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of each lesion class held out for validation",
    )
    tr.add_argument("--seed", type=int, default=0)
    for option in _family_train_options():
        tr.add_argument(
            "--" + option.name.replace("_", "-"),
            type=option.type,
            choices=option.choices,
            default=None,
            help=f"{option.help} (default {option.default})",
        )
    tr.add_argument(
        "--exclude-classes",
        type=_classes,
        default=(),
        help="comma-separated lesion classes to leave out, e.g. itc",
    )
    tr.add_argument("--no-augment", action="store_true", help="no flips/rotations")
    tr.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    tr.add_argument("--rule", choices=("enough", "paper"), default="enough")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    ev = verbs.add_parser("evaluate", help="AUROC/accuracy of a model on a cohort CSV")
    ev.add_argument("--slides", required=True, help="cohort CSV")
    ev.add_argument("--model", default="demo", help="a checkpoint path or a model name")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ev.add_argument("--out", default=None, help="also write the report (.json or .md)")
    ev.add_argument("--rule", choices=("enough", "paper"), default="enough")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (models that sample)")
    ev.add_argument(
        "--exclude-classes",
        type=_classes,
        default=(),
        help="comma-separated lesion classes to leave out",
    )
    ev.add_argument("--quiet", action="store_true")
    add_scheduler_options(ev)
    ev.set_defaults(func=cmd_evaluate)
    pa = verbs.add_parser("patch", help="tissue patches at several µm per pixel: bag files")
    pa.add_argument("slides", nargs="+", metavar="SLIDE")
    pa.add_argument("--out", required=True, help="folder of <slide stem>.h5 bag files")
    pa.add_argument(
        "--mpp",
        default="8,4,1",
        help="target µm per pixel, coarsest first, each the previous one divided by an "
        "integer (8,4,1 ≈ 1.25x, 2.5x, 10x)",
    )
    pa.add_argument("--patch-size", type=_positive_int, default=224, help="pixels a side")
    pa.add_argument(
        "--tissue-threshold", type=float, help="min tissue fraction of a coarsest patch (0.05)"
    )
    pa.add_argument("--white", type=int, help="tissue rule: glass if all channels ≥ this (215)")
    pa.add_argument("--black", type=int, help="tissue rule: padding if all channels ≤ this (40)")
    pa.add_argument("--grey-tolerance", type=int, help="tissue rule: flat grey below this (15)")
    pa.add_argument("--slide-mpp", type=float, help="µm per pixel of slides that record none")
    pa.add_argument("--overwrite", action="store_true", help="rewrite valid bag files too")
    pa.add_argument("--quiet", action="store_true")
    add_scheduler_options(pa)
    pa.set_defaults(func=cmd_patch)
    add_batch_parser(verbs, cmd_batch)
    from .bags.cli_embed import add_embed_parser  # the embed verb (issue 13)

    add_embed_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-magnet`` command."""
    args = build_parser().parse_args(argv)
    from .models.checkpoints import CheckpointError
    from .slide import SlideError

    try:
        return int(args.func(args) or 0)
    except (SlideError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
