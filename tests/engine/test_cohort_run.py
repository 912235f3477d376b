"""run_cohort on a real LocalCluster (2 worker processes, 1 thread each) over small slides."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
h5py = pytest.importorskip("h5py")

from napari_magnet.bags.patching import PatchOptions, patch_slides  # noqa: E402
from napari_magnet.engine.cohort_run import (  # noqa: E402
    SUMMARY_COLUMNS,
    SlideTask,
    TaskOutcome,
    run_cohort,
    summary_csv,
)
from napari_magnet.engine.cohort_tasks import PatchTask  # noqa: E402
from napari_magnet.synth import generate_cohort  # noqa: E402

OPTIONS = PatchOptions("8,4,2", 64)
_WHERE = ("savetodir", "save_path")  # attributes that record the output folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("cohort")
    infos = generate_cohort(folder, 4, 3, 2048, 2048, 2.0)
    return [str(info.path) for info in infos]


@pytest.fixture(scope="module")
def client():
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # CrashOnce on the workers
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _contents(path: Path) -> dict:
    """Every dataset of an HDF5 file, and the attributes but the output folder."""
    found: dict = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                found[name] = np.asarray(obj[()])
            attrs = {k: v for k, v in obj.attrs.items() if k not in _WHERE}
            found[name + "@"] = repr(sorted(attrs.items(), key=lambda kv: kv[0]))

        f.visititems(visit)
    return found


def _same(a: Path, b: Path) -> None:
    left, right = _contents(a), _contents(b)
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], np.ndarray):
            np.testing.assert_array_equal(left[key], right[key], err_msg=key)
        else:
            assert left[key] == right[key], key


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_tasks_follow_the_contract():
    assert isinstance(PatchTask("out"), SlideTask)


def test_outputs_equal_a_serial_run(slides, client, tmp_path):
    serial = patch_slides(slides, tmp_path / "serial", OPTIONS)
    assert [o.status for o in serial] == ["written"] * len(slides)
    task = PatchTask(str(tmp_path / "dask"), OPTIONS)
    seen: list[TaskOutcome] = []
    outcomes = run_cohort(task, slides, client, progress=False, on_outcome=seen.append)
    assert [o.slide for o in outcomes] == slides  # the slides' order, whatever finished first
    assert [o.status for o in outcomes] == ["written"] * len(slides)
    assert sorted(o.slide for o in seen) == sorted(slides)
    for s, o in zip(serial, outcomes):
        assert o.values["patches"] == list(s.patches)
        _same(s.output, Path(o.output))
    assert _leftovers(tmp_path / "dask") == []


def test_a_corrupted_slide_is_reported_and_the_rest_finish(slides, client, tmp_path):
    bad = tmp_path / "broken.tif"
    data = Path(slides[0]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated on purpose
    cohort = [slides[1], str(bad), slides[2]]
    outcomes = run_cohort(PatchTask(str(tmp_path / "out"), OPTIONS), cohort, client, progress=False)
    assert [o.status for o in outcomes] == ["written", "failed", "written"]
    assert outcomes[1].error and "broken" in outcomes[1].error
    assert not (tmp_path / "out" / "broken.h5").exists()
    rows = summary_csv(outcomes).splitlines()
    assert rows[0] == ",".join(SUMMARY_COLUMNS)
    assert rows[2].startswith(f"{bad},failed,")


def test_two_slides_with_one_output_fail_without_running(slides, client, tmp_path):
    twin = tmp_path / "twin"
    twin.mkdir()
    copy = twin / Path(slides[0]).name
    copy.write_bytes(Path(slides[0]).read_bytes())
    outcomes = run_cohort(
        PatchTask(str(tmp_path / "out"), OPTIONS), [slides[0], str(copy)], client, progress=False
    )
    assert [o.status for o in outcomes] == ["written", "failed"]
    assert "also writes" in outcomes[1].error


def test_resume_skips_finished_slides(slides, client, tmp_path):
    task = PatchTask(str(tmp_path / "out"), OPTIONS)
    first = run_cohort(task, slides, client, progress=False)
    assert all(o.status == "written" for o in first)
    Path(first[1].output).unlink()
    kept = Path(first[0].output).stat().st_mtime_ns
    again = run_cohort(task, slides, client, progress=False)
    assert [o.status for o in again] == ["skipped", "written", "skipped", "skipped"]
    assert Path(first[0].output).stat().st_mtime_ns == kept
    other = PatchTask(str(tmp_path / "out"), PatchOptions("8,4,2", 32))  # other options: redo
    assert all(o.status == "written" for o in run_cohort(other, slides, client, progress=False))


@dataclass(frozen=True)
class CrashOnce:
    """A test-only task: the first attempt at ``victim`` leaves a temporary file (as an
    interrupted atomic write does) and kills its worker process; later attempts work."""

    inner: PatchTask
    victim: str
    marker: str
    gpu: bool = False

    def output_for(self, slide):
        return self.inner.output_for(slide)

    def done(self, slide):
        return self.inner.done(slide)

    def recorded(self, slide):
        return self.inner.recorded(slide)

    def run(self, slide):
        if slide == self.victim and not os.path.exists(self.marker):
            Path(self.marker).write_text("died once")
            output = self.output_for(slide)
            output.parent.mkdir(parents=True, exist_ok=True)
            (output.parent / f".{output.name}.abc123.tmp").write_bytes(b"half a file")
            os._exit(1)
        return self.inner.run(slide)


def test_a_worker_killed_mid_slide_still_yields_a_complete_cohort(slides, client, tmp_path):
    out = tmp_path / "out"
    task = CrashOnce(PatchTask(str(out), OPTIONS), slides[2], str(tmp_path / "marker"))
    outcomes = run_cohort(task, slides, client, progress=False)
    assert (tmp_path / "marker").exists()  # the worker did die once
    # a finished slide whose outcome was held by the dead worker is run again: it is skipped
    assert {o.status for o in outcomes} <= {"written", "skipped"}
    assert outcomes[2].status == "written"
    assert all(task.done(s) for s in slides)
    assert _leftovers(out) == []
    client.wait_for_workers(2, timeout=60)  # the nanny brought a worker back
