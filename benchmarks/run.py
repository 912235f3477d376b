"""Run every benchmark and write benchmarks/RESULTS.md.

Usage: ``python -m benchmarks.run [name ...]`` (names: the ``bench_*`` modules without the
prefix; default all but ``learn`` and ``zoommil``, which generate and train on hundreds of
slides and run through ``make bench-learn``). Each module exposes ``run() -> list[Section] | None``; None means the
benchmark cannot run on this machine (the GPU one without CUDA) and keeps its recorded figures.
"""

from __future__ import annotations

import datetime
import importlib
import sys
import traceback
from pathlib import Path

from .common import machine

HERE = Path(__file__).resolve().parent
PARTS = HERE / "results"
ORDER = ["slide", "gui", "magnify", "ats"]
ON_REQUEST = {"learn", "zoommil"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = [p.stem[len("bench_") :] for p in sorted(HERE.glob("bench_*.py"))]
    names = argv or [n for n in ORDER if n in available] + [
        n for n in available if n not in ORDER and n not in ON_REQUEST
    ]
    failed = 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    PARTS.mkdir(exist_ok=True)
    for name in names:
        print(f"== benchmark {name}", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            sections = module.run()
            if sections is None:  # nothing measurable here: keep the figures already recorded
                print(f"   {name}: kept {PARTS / (name + '.md')}")
                continue
            body = "\n".join(s.markdown() for s in sections)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            failed += 1
            traceback.print_exc()
            body = f"## {name}\n\nFAILED:\n\n```\n{traceback.format_exc()}```\n"
        (PARTS / f"{name}.md").write_text(
            f"<!-- {name}: {stamp} on {machine()} -->\n_Measured {stamp} on: {machine()}_\n\n{body}"
        )
    parts = [PARTS / f"{n}.md" for n in ORDER] + sorted(
        p for p in PARTS.glob("*.md") if p.stem not in ORDER
    )
    text = (
        "# Benchmark results\n\n`make bench` (or `python -m benchmarks.run NAME`) writes "
        "each benchmark's section below with the machine it ran on. Ratios compare our "
        "code with the anchor measured in the same run.\n\n"
    )
    text += "\n".join(p.read_text() for p in parts if p.exists())
    (HERE / "RESULTS.md").write_text(text)
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
