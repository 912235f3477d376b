"""ZoomMIL vs gated-attention MIL (ABMIL) vs the demo MagNet on held-out synthetic slides
(``make bench-learn`` / ``python -m benchmarks.run zoommil``).

* Cohorts: the learning benchmark's held-out one (:mod:`.bench_learn`: 150 slides, 8192 × 8192
  px at 0.5 µm/px) and a 200-slide training cohort of the same kind
  (``synth --n 200 --seed 11 --positives micro,micro,macro``), generated once.
* Bags: ``napari-magnet patch --mpp 8,4,1 --patch-size 64`` of every slide, embedded with the
  shipped ``napari-small`` encoder (``napari-magnet embed``), once, into
  ``benchmarks/_data/learn/bags-64/{train,test}``.
* **zoommil** (8 → 4 → 1 µm/px) and **abmil** (gated attention over the whole 1 µm/px bag)
  train from the training bags with the same protocol (ITC excluded, 15 % for validation,
  class-weighted sampling, Adam 1e-4, ReduceLROnPlateau, best validation epoch), for
  ``NAPARI_MAGNET_BENCH_ZOOMMIL_EPOCHS`` epochs (default 100, the anchor's); runs resume.
* **magnet3-lite** is the shipped demo checkpoint.

Every model is evaluated through ``magnify`` on the held-out slides — for ZoomMIL and ABMIL
that means reading and embedding the patches from the pyramid, not the stored features: the
first bag is embedded, then only the selected patches' children. Reported: AUROC per lesion
class and size, "ROI on lesion" (a final ROI at least half inside a lesion box), FLOPs per
slide (torch's FlopCounterMode over whole ``magnify`` runs of a sample of held-out slides),
patches embedded and pixels read per slide, seconds per slide.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bench_learn import LEARN_DIR, SLIDE, TEST, _budget, _row_of, cohort
from .common import Section

TRAIN = {"n": 200, "seed": 11, "positives": ("micro", "micro", "macro"), **SLIDE}
EPOCHS = int(os.environ.get("NAPARI_MAGNET_BENCH_ZOOMMIL_EPOCHS", 100))
BAGS = LEARN_DIR / "bags-64"
MPPS = (8.0, 4.0, 1.0)
PATCH = 64
ENCODER = "napari-small"
FLOP_SLIDES = 6
GOAL = (
    "ZoomMIL AUROC ≥ ABMIL's at ≤ 1/10 of its FLOPs per slide; say whether dense "
    "low-magnification attention finds the 0.2–1 mm lesions MagNet's last zoom misses"
)


def bags(name: str, csv_path: Path) -> Path:
    """The cohort's bag files with features (made once; a rerun skips finished bags)."""
    from napari_magnet.bags.embedding import embed_bags
    from napari_magnet.bags.encoders import build_encoder
    from napari_magnet.bags.patching import PatchOptions, patch_slides
    from napari_magnet.engine.cohort import read_cohort

    out = BAGS / name
    slides = [r.path for r in read_cohort(csv_path, require_both_labels=False)]
    print(f"  bags of the {name} cohort ({len(slides)} slides) in {out}", flush=True)
    outcomes = patch_slides(slides, out, PatchOptions(mpps=MPPS, patch_size=PATCH))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise RuntimeError(f"patching failed: {failed[0].slide_path}: {failed[0].reason}")
    encoder = build_encoder(ENCODER)
    files = sorted(out.glob("*.h5"))
    embedded = embed_bags(files, out, encoder, dtype="float16", slides_dir=slides[0].parent)
    failed = [o for o in embedded if o.status == "failed"]
    if failed:
        raise RuntimeError(f"embedding failed: {failed[0].bag}: {failed[0].reason}")
    return out


def train_mil(name: str, train_csv: Path, bag_dir: Path) -> tuple[Path, str]:
    """Train ``name`` from the bags here: ``(best checkpoint, training budget)``."""
    import json

    import torch

    from napari_magnet.engine.training import TrainOptions, train

    out = LEARN_DIR / "runs" / name
    state = out / "train_state.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resume = out if state.exists() else None
    options = TrainOptions(
        slides=train_csv,
        out=out,
        model=None if resume else name,
        epochs=EPOCHS,
        device=device,
        resume=resume,
        val_fraction=0.15,
        seed=0,
        exclude_classes=("itc",),
        family_options={"bags": str(bag_dir)},
    )
    train(options)
    history = json.loads(state.read_text())["history"]
    key = "seconds" if device == "cuda" else "cpu_seconds"
    where = f"on {torch.cuda.get_device_name()}" if device == "cuda" else "CPU"
    return out / "best.safetensors", _budget(sum(r[key] for r in history), where)


def flops_per_slide(model, records) -> float:
    """Mean FLOPs of whole ``magnify`` runs over ``records`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from napari_magnet import open_slide
    from napari_magnet.engine.magnify import magnify

    totals = []
    for record in records:
        with open_slide(record.path) as slide, FlopCounterMode(display=False) as counter:
            for _ in magnify(slide, model, device="cpu"):
                pass
        totals.append(counter.get_total_flops())
    return float(np.mean(totals))


def mil_flops(model, embedded: int) -> float:
    """FLOPs of a ZoomMIL/ABMIL run that embedded ``embedded`` patches: the encoder's, measured
    on one patch, times the patches, plus the heads over bags of those sizes."""
    from napari_magnet.models.zoommil import bag_sizes, slide_flops

    cfg = model.config
    n_first = embedded - (sum(bag_sizes(cfg, 10**9)[1:]) if cfg.steps > 1 else 0)
    return float(slide_flops(model, bag_sizes(cfg, max(int(n_first), 1))).total)


def patches_in_bags(bag_dir: Path, records) -> dict[str, float]:
    """Mean patches per slide of each magnification in the held-out bags, and in total."""
    from napari_magnet.bags.bagfile import read_bag
    from napari_magnet.bags.patching import bag_path_for

    counts = []
    for r in records:
        bag = read_bag(bag_path_for(r.path, bag_dir), features=False)
        counts.append([len(level) for level in bag.levels])
    mean = np.mean(np.asarray(counts, dtype=float), axis=0)
    return {**{f"{m:g}": float(v) for m, v in zip(MPPS, mean)}, "all": float(mean.sum())}


def _size_rows(rows: list[dict]) -> dict[str, dict]:
    return {r["group"]: r for r in rows if r["group"].startswith("lesion ")}


def run() -> list[Section]:
    from napari_magnet.engine.cohort import read_cohort
    from napari_magnet.engine.evaluation import evaluate_cohort, summarize
    from napari_magnet.models.registry import DEMO_CHECKPOINT, load_model

    train_csv = cohort("train-200", TRAIN)
    test_csv = cohort("test", TEST)
    train_bags = bags("train", train_csv)
    test_bags = bags("test", test_csv)
    test_records = read_cohort(test_csv)
    sample = test_records[:: max(1, len(test_records) // FLOP_SLIDES)][:FLOP_SLIDES]
    in_bags = patches_in_bags(test_bags, test_records)

    entries = []  # name, rows, budget, flops, patches embedded per slide
    checks = []  # FlopCounterMode over whole runs vs the count, on the sample
    for name in ("zoommil", "abmil"):
        print(f"  training {name} from the bags ({EPOCHS} epochs)", flush=True)
        path, budget = train_mil(name, train_csv, train_bags)
        model = load_model(path, device="cpu")
        print(f"  evaluating {name} on {len(test_records)} held-out slides", flush=True)
        outcomes = evaluate_cohort(test_records, model, device="cpu")
        rows = summarize(outcomes)
        embedded = {o.path: o.pixels_processed // (PATCH * PATCH * 3) for o in outcomes}
        flops = np.mean([mil_flops(model, n) for n in embedded.values()])
        measured = flops_per_slide(model, sample)
        counted = np.mean([mil_flops(model, embedded[str(r.path)]) for r in sample])
        checks.append(f"{name}: {measured / 1e9:.3f} vs {counted / 1e9:.3f} GFLOPs")
        entries.append((name, rows, budget, flops, float(np.mean(list(embedded.values())))))
    print("  evaluating the demo MagNet", flush=True)
    magnet = load_model(DEMO_CHECKPOINT, device="cpu")
    rows = summarize(evaluate_cohort(test_records, magnet, device="cpu"))
    entries.append(("magnet3-lite (demo)", rows, "shipped", flops_per_slide(magnet, sample), None))

    table = Section(
        title="ZoomMIL vs ABMIL vs MagNet (held-out synthetic slides)",
        goal=GOAL,
        header=[
            "model",
            "training",
            "AUROC all",
            "AUROC macro",
            "AUROC micro",
            "AUROC ITC",
            "accuracy",
            "GFLOPs / slide",
            "patches embedded / slide",
            "pixels read / slide",
            "s / slide",
        ],
    )
    for name, rows, budget, flops, patches in entries:
        all_row = _row_of(rows, "all")

        def auroc(group: str, rows=rows) -> str:
            row = next((r for r in rows if r["group"] == group), None)
            return "—" if row is None or row["auroc"] != row["auroc"] else f"{row['auroc']:.3f}"

        table.rows.append(
            [
                name,
                budget,
                auroc("all"),
                auroc("macro"),
                auroc("micro"),
                auroc("itc"),
                f"{all_row['accuracy']:.3f}",
                f"{flops / 1e9:.2f}",
                "—" if patches is None else f"{patches:.0f}",
                f"{all_row['mean_pixels_read'] / 1e6:.2f} M",
                f"{all_row['mean_seconds']:.2f}",
            ]
        )

    sizes = Section(
        title="ZoomMIL: lesions by size — AUROC / final ROI on the lesion (positives)",
        goal="where each model looks: a final ROI at least half inside a lesion box",
        header=["lesion size", *[e[0] for e in entries]],
    )
    by_model = [_size_rows(e[1]) for e in entries]
    for group in sorted({g for rows in by_model for g in rows}):
        cells = []
        for rows in by_model:
            row = rows.get(group)
            if row is None:
                cells.append("—")
                continue
            looked = row.get("roi_on_lesion", float("nan"))
            cells.append(
                f"{row['auroc']:.3f} / "
                f"{'—' if looked != looked else f'{looked:.0%}'} ({row['n_positive']})"
            )
        sizes.rows.append([group, *cells])

    zoom, abmil = entries[0], entries[1]
    z_auc, a_auc = _row_of(zoom[1], "all")["auroc"], _row_of(abmil[1], "all")["auroc"]
    ratio = zoom[3] / abmil[3] if abmil[3] else float("nan")
    table.notes += [
        f"held-out cohort `synth --n {TEST['n']} --seed {TEST['seed']}`; training cohort "
        f"`synth --n {TRAIN['n']} --seed {TRAIN['seed']}` (ITC excluded, 15 % validation)",
        f"bags: {', '.join(f'{m:g}' for m in MPPS)} µm/px, {PATCH} px patches, encoder "
        f"`{ENCODER}` (shipped); held-out bags hold on average "
        + ", ".join(f"{v:.0f} patches at {k} µm/px" for k, v in in_bags.items() if k != "all")
        + f" ({in_bags['all']:.0f} in all: what embedding every patch at every magnification "
        f"costs, as the public ZoomMIL code does)",
        f"ZoomMIL AUROC {z_auc:.3f} vs ABMIL {a_auc:.3f} "
        f"({'reached' if z_auc >= a_auc else 'NOT reached'}: ≥); FLOPs ratio "
        f"{ratio:.3f} ({'reached' if ratio <= 0.1 else 'NOT reached'}: ≤ 0.1)",
        "ZoomMIL and ABMIL are evaluated from the slides (patches read and embedded through "
        "`magnify`), not from the stored features; their FLOPs per slide are the mean over "
        "every held-out slide of the patches it embedded × the encoder's FLOPs on one patch "
        "+ the heads, which equals torch's FlopCounterMode over whole `magnify` runs of "
        f"{len(sample)} of them ({'; '.join(checks)}); MagNet's are FlopCounterMode's over "
        "those runs",
    ]
    return [table, sizes]


def ship_demo() -> Path:
    """Train ZoomMIL on the training bags (resuming) and ship its best epoch as
    ``zoommil-demo`` (``make zoommil-demo-model``)."""
    from napari_magnet.engine.training import export_model
    from napari_magnet.models.registry import SHIPPED

    train_csv = cohort("train-200", TRAIN)
    path, budget = train_mil("zoommil", train_csv, bags("train", train_csv))
    export_model(
        path,
        SHIPPED["zoommil-demo"],
        notes=(
            "Demo model: ZoomMIL (8 → 4 → 1 µm/px, napari-small encoder) trained on synthetic "
            "slides only (make zoommil-demo-model). Not for diagnosis."
        ),
        extra={
            "cohort": "napari-magnet synth --n 200 --seed 11 --positives micro,micro,macro "
            "--width 8192 --height 8192 --mpp 0.5",
            "bags": f"napari-magnet patch --mpp 8,4,1 --patch-size {PATCH}; "
            f"napari-magnet embed --encoder {ENCODER}",
            "training_budget": budget,
        },
    )
    return SHIPPED["zoommil-demo"]


if __name__ == "__main__":
    print(ship_demo())
