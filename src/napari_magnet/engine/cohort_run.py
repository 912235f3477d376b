"""Run one task per slide of a cohort on dask.distributed (``--scheduler`` / ``--workers``).

A *task* is a small picklable object that knows how to process one slide and whether that
slide is already finished (the contract, :class:`SlideTask`)::

    task.output_for(slide) -> Path      # where the slide's output goes (file or folder)
    task.done(slide) -> bool            # the output exists and validates: skip the slide
    task.recorded(slide) -> dict        # values of a finished output (for the summary)
    task.run(slide) -> TaskOutcome      # do the work; write the output atomically

:func:`run_cohort` sends one dask task per slide to a cluster — a ``LocalCluster`` of
worker processes by default, or an existing scheduler (``tcp://host:8786``) — and collects
one :class:`TaskOutcome` per slide, in the order the slides were given:

* the ``done`` check runs on the worker, right before the work, so a re-run of a cohort
  skips every slide whose output is complete (resumable);
* a slide that fails (``run`` returns ``"failed"``, or raises after ``retries`` retries) is
  reported with its reason and the other slides go on;
* a worker that dies mid-slide (killed, out of memory, ``os._exit``) is replaced by its
  nanny and the scheduler runs the slide again elsewhere (up to dask's
  ``distributed.scheduler.allowed-failures``); since outputs are written to a temporary
  name and renamed (:mod:`napari_magnet.io.atomic`), the dead attempt leaves no partial
  output.

Slides travel as *paths*: on a cluster every worker must see the slides and the output
folder at the same paths (shared storage). Imports neither napari nor Qt, nor torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..io.atomic import atomic_write_text

__all__ = [
    "SUMMARY_COLUMNS",
    "SlideTask",
    "TaskOutcome",
    "cohort_client",
    "counts",
    "default_workers",
    "run_cohort",
    "run_one",
    "summary_csv",
    "worker_device",
    "write_summary",
]

#: Columns of the summary CSV.
SUMMARY_COLUMNS: tuple[str, ...] = ("slide", "status", "probability", "seconds", "error")


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one slide.

    Parameters
    ----------
    slide : str
        The slide's path, as given.
    output : str
        Its output (a file or a folder).
    status : str
        ``"written"``, ``"skipped"`` (the output existed and validated) or ``"failed"``.
    seconds : float
        Time spent on the slide by the worker (0 when the worker died).
    error : str
        Why it failed (empty otherwise).
    values : dict
        Task-specific results: ``probability`` for a magnify run, ``patches`` for patching.
    """

    slide: str
    output: str
    status: str
    seconds: float = 0.0
    error: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SlideTask(Protocol):
    """The contract of a per-slide task (see the module docstring); must be picklable."""

    #: Whether the task runs a model that prefers a GPU (one worker per device).
    gpu: bool

    def output_for(self, slide: str) -> Path:
        """The slide's output path (two slides may not share one)."""

    def done(self, slide: str) -> bool:
        """True when the slide's output exists and validates (the slide is skipped)."""

    def recorded(self, slide: str) -> dict[str, Any]:
        """The values of a finished output, for the summary of a skipped slide."""

    def run(self, slide: str) -> TaskOutcome:
        """Process the slide, write its output atomically; failures are returned."""


def run_one(task: SlideTask, slide: str) -> TaskOutcome:
    """What a worker runs for one slide: skip it when done, else run the task.

    Exceptions the task lets through propagate, so dask retries them (``retries``).
    """
    start = time.perf_counter()
    if task.done(slide):
        return TaskOutcome(
            slide,
            str(task.output_for(slide)),
            "skipped",
            seconds=time.perf_counter() - start,
            values=task.recorded(slide),
        )
    return task.run(slide)


def worker_device(device: str = "auto") -> str:
    """The torch device a task should use on the worker it runs on.

    ``"auto"`` and ``"cuda"`` become ``cuda:<i>`` with ``i`` the worker's number modulo the
    number of CUDA devices, so a ``LocalCluster`` with one worker per GPU puts one worker on
    each device; without CUDA ``"auto"`` is ``"cpu"``. Any other value is returned as is.
    """
    if device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "cpu" if device == "auto" else device
    index = 0
    with contextlib.suppress(ImportError, ValueError):
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else abs(hash(name))
    return f"cuda:{index % count}"


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_workers(gpu: bool, slides: int | None = None) -> int:
    """Workers of a default ``LocalCluster``: one per CUDA device for a GPU task when CUDA is
    present, else one per CPU core; never more than ``slides``."""
    n = (_cuda_count() if gpu else 0) or (os.cpu_count() or 1)
    return max(1, min(n, slides)) if slides else max(1, n)


#: Variables distributed sets in the parent process for its workers.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MALLOC_TRIM_THRESHOLD_",
)


@contextlib.contextmanager
def cohort_client(
    scheduler: str | None = None, workers: int | None = None, *, gpu: bool = False
) -> Iterator[Any]:
    """A dask ``Client``: of an existing scheduler, or of a new ``LocalCluster``.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); its workers are used as they
        are (``workers`` is ignored).
    workers : int, optional
        Worker processes of the ``LocalCluster`` (one thread each); default
        :func:`default_workers`.
    gpu : bool
        Whether the default number of workers is one per CUDA device.

    Raises
    ------
    ValueError
        When dask.distributed is not installed.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise ValueError(
            "--scheduler/--workers need dask.distributed: pip install 'napari-magnet[distributed]'"
        ) from error
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    n = workers or default_workers(gpu)
    # distributed sets OMP_NUM_THREADS=1 (and friends) in this process's environment for its
    # worker processes and leaves them there: every later subprocess would run torch on one
    # thread. Put the caller's environment back once the cluster is gone.
    saved = {name: os.environ.get(name) for name in _THREAD_ENV}
    try:
        with (
            LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _error_text(error: BaseException) -> str:
    name = type(error).__name__
    if name == "KilledWorker":
        return "the worker died on this slide every time it was tried (KilledWorker)"
    text = str(error)
    return f"{name}: {text}" if text else name


def run_cohort(
    task: SlideTask,
    slides: Sequence[str | os.PathLike],
    client: Any,
    *,
    retries: int = 2,
    progress: bool = True,
    on_outcome: Callable[[TaskOutcome], None] | None = None,
) -> list[TaskOutcome]:
    """Run ``task`` on every slide on ``client``'s cluster; one outcome per slide.

    Parameters
    ----------
    task : SlideTask
        The per-slide task (pickled to the workers).
    slides : sequence of path-like
        The slides, as paths the workers can open.
    client : distributed.Client
        See :func:`cohort_client`.
    retries : int
        Times dask reruns a slide whose task raised (a worker's death is rescheduled by
        the scheduler on its own).
    progress : bool
        Show a tqdm bar over the slides as they complete (on stderr).
    on_outcome : callable, optional
        Called with each outcome as it arrives (completion order).

    Returns
    -------
    list of TaskOutcome
        In the order of ``slides``. Two slides with the same output fail, the second one
        with that reason, without running.
    """
    from distributed import as_completed
    from tqdm import tqdm

    slides = [os.fspath(s) for s in slides]
    outcomes: list[TaskOutcome | None] = [None] * len(slides)
    owners: dict[Path, str] = {}
    futures: dict[Any, int] = {}
    bar = tqdm(total=len(slides), unit="slide", file=sys.stderr, disable=not progress or None)

    def settle(index: int, outcome: TaskOutcome) -> None:
        outcomes[index] = outcome
        bar.update(1)
        if on_outcome is not None:
            on_outcome(outcome)

    for index, slide in enumerate(slides):
        output = Path(task.output_for(slide))
        if output in owners:
            reason = f"{owners[output]} also writes {output.name}"
            settle(index, TaskOutcome(slide, str(output), "failed", error=reason))
            continue
        owners[output] = slide
        future = client.submit(run_one, task, slide, retries=retries, pure=False)
        futures[future] = index
    try:
        for future in as_completed(list(futures)):
            index = futures[future]
            if future.status == "finished":
                outcome = future.result()
            else:
                error = future.exception()
                outcome = TaskOutcome(
                    slides[index],
                    str(task.output_for(slides[index])),
                    "failed",
                    error=_error_text(error),
                )
            settle(index, outcome)
    finally:
        bar.close()
        for future in futures:
            future.release()
    return [o for o in outcomes if o is not None]


def summary_csv(outcomes: Sequence[TaskOutcome]) -> str:
    """The summary as CSV text: :data:`SUMMARY_COLUMNS`, one row per slide."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for o in outcomes:
        probability = o.values.get("probability")
        writer.writerow(
            [
                o.slide,
                o.status,
                "" if probability is None else f"{float(probability):.6f}",
                f"{o.seconds:.3f}",
                o.error,
            ]
        )
    return buffer.getvalue()


def write_summary(path: str | os.PathLike, outcomes: Sequence[TaskOutcome]) -> Path:
    """Write :func:`summary_csv` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, summary_csv(outcomes))


def counts(outcomes: Sequence[TaskOutcome]) -> str:
    """One line: how many slides were written, skipped and failed."""
    n = {s: sum(o.status == s for o in outcomes) for s in ("written", "skipped", "failed")}
    return ", ".join(f"{k} {s}" for s, k in n.items())
