"""Shared pieces of the benchmarks: the machine, the big synthetic slide, timing helpers."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(
    os.environ.get("NAPARI_MAGNET_BENCH_DATA", Path(__file__).resolve().parent / "_data")
)
BIG_SIDE = int(os.environ.get("NAPARI_MAGNET_BENCH_SIDE", 100_000))


@dataclass
class Section:
    """One benchmark's figures, rendered as a Markdown section of RESULTS.md."""

    title: str
    goal: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Goal: {self.goal}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def machine() -> str:
    """A one-line description of the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
            mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def big_slide_path(progress: bool = True) -> Path:
    """The generated ``BIG_SIDE``² synthetic slide, made once and reused."""
    from napari_magnet.synth import SyntheticSlideSpec, generate_slide

    path = DATA_DIR / f"synthetic_{BIG_SIDE}.tif"
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSlideSpec(
        width=BIG_SIDE, height=BIG_SIDE, mpp=0.25, seed=1, label=1, lesion_kind="macro"
    )
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if progress and (done == total or done % max(total // 20, 1) == 0):
            print(
                f"  generating {path.name}: {done}/{total} tiles "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    generate_slide(path, spec, progress=report)  # writes a temporary file, renames when done
    return path
