"""A model family defined entirely here plugs into every route: magnify, train, evaluate, the CLI
and the widget in a real viewer — with no edit anywhere else.

The toy family ("brightest-grid") cuts the start region into a uniform grid, picks the K
brightest cells and classifies the slide from how dark they are: a learned weight and bias on
the mean darkness of its picks.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_magnet.engine.batches import uint8_to_float
from napari_magnet.engine.frames import clip_boxes
from napari_magnet.engine.types import MagnifyResult, MagnifyStep
from napari_magnet.models.family import Family, TrainOption, register_family, unregister_family

ARCHITECTURE = "brightest-grid"


@dataclass(frozen=True)
class GridConfig:
    name: str = "grid-k3"
    grid: int = 8
    k: int = 3
    cell_px: int = 8

    @property
    def view_size(self) -> int:
        return self.grid * self.cell_px

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> GridConfig:
        return cls(**{k: d[k] for k in ("name", "grid", "k", "cell_px")})

    def config_hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class BrightestGrid(nn.Module):
    architecture = ARCHITECTURE

    def __init__(self, config: GridConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def brightness(self, view: torch.Tensor) -> torch.Tensor:
        """``(B, grid, grid)`` mean brightness of each cell."""
        return F.avg_pool2d(view.mean(dim=1, keepdim=True), self.config.cell_px)[:, 0]

    def forward(self, view: torch.Tensor):
        cells = self.brightness(view).flatten(1)
        top = cells.topk(self.config.k, dim=1)
        darkness = 1.0 - top.values.mean(dim=1)
        return self.weight * darkness + self.bias, top.indices, cells


def run_grid(model, reader, frame, visible, device, options):
    cfg = model.config
    batch = reader.read(frame, cfg.view_size, visible)
    logit, picks, cells = model(batch.to_tensor(device))
    picks = picks[0].cpu().numpy()
    side = (frame[0, 2] - frame[0, 0]) / cfg.grid
    rows, cols = np.divmod(picks, cfg.grid)
    boxes = np.stack(
        [
            frame[0, 0] + cols * side,
            frame[0, 1] + rows * side,
            frame[0, 0] + (cols + 1) * side,
            frame[0, 1] + (rows + 1) * side,
        ],
        axis=1,
    )
    attention = torch.softmax(cells[0], dim=0).reshape(cfg.grid, cfg.grid).cpu().numpy()
    yield MagnifyStep(
        layer=1,
        region_ids=[str(i + 1) for i in range(cfg.k)],
        parent_ids=[""] * cfg.k,
        boxes=clip_boxes(boxes, visible[0]),
        levels=np.repeat(batch.levels, cfg.k),
        attention_maps=[attention],
        attention_boxes=frame.copy(),
        attention_mass=attention.reshape(-1)[picks].astype(float),
        scales=np.full(cfg.k, 1.0 / cfg.grid),
    )
    probability = float(torch.sigmoid(logit)[0])
    return MagnifyResult(
        probability=probability,
        label=int(probability >= 0.5),
        pixels_processed=cfg.view_size**2 * 3,
        pixels_read=0,
        seconds=0.0,
        model_name=getattr(model, "model_name", cfg.name),
        checkpoint_sha256=getattr(model, "checkpoint_sha256", ""),
        config_hash=cfg.config_hash(),
    )


class GridTask:
    schedule_enabled = False

    def __init__(self, model, options, device) -> None:
        self.model, self.device = model, device
        self.sizes = (model.config.view_size,)
        scale = options.family_options.get("grid_lr_scale", 1.0)
        self.optimizers = {
            "adam": torch.optim.Adam(model.parameters(), lr=(options.lr or 1e-2) * scale)
        }

    def default_batch_size(self) -> int:
        return 2

    def loss(self, images, labels, batch, generator, amp):
        logit, _, _ = self.model(uint8_to_float(images[0], self.device))
        loss = F.binary_cross_entropy_with_logits(logit, labels.float())
        return loss, {"classification": float(loss.detach())}, torch.sigmoid(logit).detach()

    def backward_step(self, loss, scaler, schedule) -> None:
        opt = self.optimizers["adam"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state) -> None:
        pass


def _named(config: GridConfig):
    return lambda: BrightestGrid(config)


TOY = Family(
    architecture=ARCHITECTURE,
    config_class=GridConfig,
    build=lambda d: BrightestGrid(GridConfig.from_dict(d)),
    configs={"grid-k3": _named(GridConfig()), "grid-k5": _named(GridConfig("grid-k5", k=5))},
    magnify=run_grid,
    training_task=GridTask,
    adjustable_patches=False,
    expected_steps=lambda model: 1,
    train_options=(TrainOption("grid_lr_scale", 1.0, "multiplies the learning rate", float),),
    order=1000,
    description="the K brightest cells of a uniform grid (a test family)",
)


@pytest.fixture
def toy_family():
    register_family(TOY)
    yield TOY
    unregister_family(ARCHITECTURE)


@pytest.fixture(scope="module")
def toy_cohort(tmp_path_factory):
    from napari_magnet.synth import generate_cohort

    root = tmp_path_factory.mktemp("toy-cohort")
    generate_cohort(root, 4, seed=5, width=2048, height=2048, mpp=2.0, positives=["macro"])
    return root / "cohort.csv"


def test_toy_family_runs_through_magnify(toy_family, toy_cohort):
    from napari_magnet import load_model, magnify, open_slide
    from napari_magnet.engine.cohort import read_cohort
    from napari_magnet.models.registry import family_of_spec, known_models, listed_models

    assert {"grid-k3", "grid-k5"} <= set(known_models())
    assert listed_models()[-2:] == ["grid-k3", "grid-k5"]
    assert family_of_spec("grid-k5") is TOY
    model = load_model("grid-k5", device="cpu")
    record = read_cohort(toy_cohort)[0]
    with open_slide(record.path) as slide:
        items = list(magnify(slide, model, device="cpu"))
        (step,), result = items[:-1], items[-1]
        assert step.region_ids == ["1", "2", "3", "4", "5"]
        width, height = slide.dimensions
        assert (step.boxes[:, 0] >= 0).all() and (step.boxes[:, 2] <= width).all()
        assert (step.boxes[:, 1] >= 0).all() and (step.boxes[:, 3] <= height).all()
        assert 0.0 < result.probability < 1.0 and result.model_name == "grid-k5"
        assert result.pixels_read > 0
        with pytest.raises(ValueError, match="fixed by its architecture"):
            list(magnify(slide, model, device="cpu", n_patches=4))


def test_toy_family_trains_evaluates_and_runs_from_the_cli(
    toy_family, toy_cohort, tmp_path, capsys
):
    from napari_magnet.cli import main
    from napari_magnet.models.registry import load_model

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "brightest-grid: the K brightest cells" in listing and "  grid-k5" in listing

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--slides",
                str(toy_cohort),
                "--model",
                "grid-k3",
                "--epochs",
                "1",
                "--val-fraction",
                "0.5",
                "--device",
                "cpu",
                "--out",
                str(run),
                "--grid-lr-scale",
                "2",
            ]
        )
        == 0
    )
    state = json.loads((run / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["model"]["architecture"] == ARCHITECTURE
    assert state["options"]["family_options"] == {"grid_lr_scale": 2.0}
    trained = load_model(str(run / "last.safetensors"), device="cpu")
    assert isinstance(trained, BrightestGrid)
    assert not math.isclose(float(trained.weight), 1.0)  # one epoch of Adam moved it

    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--slides",
                str(toy_cohort),
                "--model",
                str(run / "last.safetensors"),
                "--device",
                "cpu",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    figures = json.loads(report.read_text())
    assert len(figures["slides"]) == 4

    slide = json.loads(report.read_text())["slides"][0]["path"]
    out = tmp_path / "magnify"
    assert main(["magnify", slide, "--model", "grid-k3", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["result"]["model_name"] == "grid-k3"
    capsys.readouterr()


def test_toy_family_runs_in_the_widget_of_a_real_viewer(
    toy_family, toy_cohort, tmp_path, make_napari_viewer, qtbot, monkeypatch
):
    from napari_magnet._napari.layers import layer_info, layer_kind
    from napari_magnet._napari.widget import add_magnify_widget
    from napari_magnet.engine.cohort import read_cohort

    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer)
    names = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "grid-k3" in names and "grid-k5" in names
    (slide,) = viewer.open(str(read_cohort(toy_cohort)[0].path), plugin="napari-magnet")
    widget.set_model("grid-k5")
    assert not widget.patches_spin.isEnabled()  # the family's patches are fixed
    widget.set_device("cpu")
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=120_000)
    run = widget.last_runs[slide.metadata["path"]]
    assert run.result is not None and run.result.model_name == "grid-k5"
    (rois,) = [lyr for lyr in viewer.layers if layer_kind(lyr) == "rois"]
    assert rois.nshapes == 5 and layer_info(rois)["layer"] == 1
    assert list(rois.features["id"]) == ["1", "2", "3", "4", "5"]
    assert any(layer_kind(lyr) == "attention" for lyr in viewer.layers)
