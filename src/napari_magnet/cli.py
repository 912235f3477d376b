"""The ``napari-magnet`` command: demo, info, synth, magnify.

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

    from .slide.synthetic import SyntheticSlideSpec, generate_cohort, generate_slide

    out = Path(args.out)
    bar = tqdm(unit="tile" if args.n == 1 else "slide", disable=args.quiet)

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        if args.n == 1 and out.suffix.lower() in (".tif", ".tiff"):
            spec = SyntheticSlideSpec(width=args.width, height=args.height, mpp=args.mpp,
                                      seed=args.seed, label=args.label,
                                      lesion_kind=args.lesion)
            info = generate_slide(out, spec, progress=report)
            bar.close()
            print(f"wrote {info.path} ({info.width} x {info.height} px, label {info.label}, "
                  f"{info.lesion_kind}); ground truth in {info.sidecar}")
        else:
            infos = generate_cohort(out, args.n, args.seed, args.width, args.height, args.mpp,
                                    progress=report)
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
        for item in magnify(slide, model, device=args.device, box=args.box, rule=args.rule,
                            n_patches=args.n_patches, seed=args.seed):
            if isinstance(item, MagnifyResult):
                result = item
            else:
                steps.append(item)
                print(f"layer {item.layer}: {len(item.region_ids)} regions", flush=True)
        paths = export_run(args.out, slide.requested_path, slide.mpp, steps, result)
    print(f"probability {result.probability:.3f} (label {result.label}); "
          f"{result.pixels_processed:,} values processed, {result.pixels_read:,} read; "
          f"{result.seconds:.2f} s")
    print(f"wrote {len(paths)} files into {args.out}")
    return 0


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_demo(args: argparse.Namespace) -> int:
    if not _has_display() and not args.headless:
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            print("error: no display and no xvfb-run; install Xvfb (make demo does) or run "
                  "with a display", file=sys.stderr)
            return 2
        command = [xvfb, "-a", "-s", "-screen 0 1600x1000x24", sys.executable, "-m",
                   "napari_magnet.cli", "demo", "--headless", "--out", str(args.out)]
        if args.model:
            command += ["--model", args.model]
        return subprocess.call(command)
    from ._napari.demo import run_demo

    return run_demo(headless=args.headless, out_dir=Path(args.out), model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-magnet",
                                     description="Magnifying networks for whole-slide images.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="open napari with the sample slide and Magnify")
    demo.add_argument("--out", default="demo-output", help="folder for the headless screenshot")
    demo.add_argument("--model", default=None, help="model to run (default: demo, else "
                      "magnet3-lite)")
    demo.add_argument("--headless", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    info = verbs.add_parser("info", help="print a slide's geometry and metadata")
    info.add_argument("slide")
    info.set_defaults(func=cmd_info)

    synth = verbs.add_parser("synth", help="generate synthetic slides (one, or a cohort)")
    synth.add_argument("--out", required=True,
                       help="a .tif path for one slide, or a folder for a cohort")
    synth.add_argument("--n", type=_positive_int, default=1, help="number of slides")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--width", type=_positive_int, default=16_384)
    synth.add_argument("--height", type=_positive_int, default=12_288)
    synth.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel")
    synth.add_argument("--label", type=int, choices=(0, 1), default=None)
    synth.add_argument("--lesion", choices=("macro", "micro", "itc", "negative"), default=None)
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=cmd_synth)

    mag = verbs.add_parser("magnify", help="run a model on a slide and export the results")
    mag.add_argument("slide")
    mag.add_argument("--model", default="magnet3", help="magnet3, magnet4, magnet3-lite, ats, "
                     "demo, or a checkpoint path")
    mag.add_argument("--out", required=True, help="output folder")
    mag.add_argument("--device", default="auto", help="auto, cpu or cuda")
    mag.add_argument("--box", type=_box, default=None, help="x0,y0,x1,y1 level-0 box")
    mag.add_argument("--rule", choices=("enough", "paper"), default="enough")
    mag.add_argument("--n-patches", type=_positive_int, default=None,
                     help="patches drawn by an attention-sampling model")
    mag.add_argument("--seed", type=int, default=0)
    mag.set_defaults(func=cmd_magnify)
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
