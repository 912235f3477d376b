"""Training models of any trainable family on slide cohorts (DESIGN §4 Training, §5).

``napari-magnet train`` calls :func:`train`. What it does:

* **Cohort.** The CSV is read and validated first
  (:func:`~napari_magnet.engine.cohort.read_cohort`): any problem is a
  :class:`~napari_magnet.engine.cohort.CohortError` before a slide is opened or a model
  built. A stratified split (by lesion class, seeded) gives training and validation slides.
* **Family.** The trainer names no model family: it asks the model's family
  (:func:`~napari_magnet.models.family.family_of`) for its *task*
  (``Family.training_task``, see :class:`~napari_magnet.models.family.TrainingTask`), which
  owns the optimizers, the default batch size and learning rate, whether the learning rate
  is annealed, the forward and the loss (each family's ``models/<family>/training.py``).
* **Data.** A ``DataLoader`` over slides; the Dataset renders the task's layer-1 inputs
  (the slide letterboxed into a square, as ``magnify`` does) with the threaded
  :class:`~napari_magnet.engine.regions.RegionReader` of each slide. The deeper reads
  happen inside the task's forward, through the step's
  :class:`~napari_magnet.engine.batches.SlideBatch`: every slide of the batch read in
  parallel from the same readers.
* **Augmentation** (flips and 90° rotations, one random element of the dihedral group per
  slide and epoch). Layer 1's images are transformed after reading; a task maps what it
  reads deeper back with :meth:`~napari_magnet.models.augment.Dihedral.to_original` to
  find the level-0 region, reads it unrotated and transforms it with the same op — so
  every read shows exactly what the augmented slide shows there.
* **Optimisation.** The task's optimizers, stepped once per batch; the learning rate
  follows :class:`CosineSchedule` (cosine annealing per step over the whole run) when the
  task asks for it. Mixed precision (``torch.autocast`` bf16, or fp16 + ``GradScaler`` on
  GPUs without bf16) only on CUDA.
* **Every epoch:** validation AUROC and accuracy, ``metrics.csv`` and
  ``learning_curve.png`` rewritten from the history, the model after the epoch as
  ``last.safetensors`` + ``.json``, the best one (validation AUROC, then accuracy, then lower
  validation loss) as ``best.*`` (both :mod:`~napari_magnet.models.checkpoints` pairs,
  loadable with ``load_model``), and the **training state** — model, optimizers, schedule,
  scaler, epoch, best metric, history — as ``train_state/epoch-NNNN.safetensors`` (tensors,
  optimizer state under flattened keys) + ``train_state.json`` (everything else, with the
  tensors' sha256). Nothing is pickled. ``train_state.json`` is replaced atomically after
  its tensors are on disk, so an interruption at any moment leaves the last completed epoch
  resumable with ``resume=<out dir>``.

Determinism: the initial weights come from ``seed``; the shuffling, the augmentation ops and
the patch sampling of epoch ``e`` from ``(seed, e)`` — so a resumed run draws what an
uninterrupted one would have.

Modules: :mod:`.options` (:class:`TrainOptions`, :class:`TrainResult`), :mod:`.loop`
(:func:`train`, one pass over a split), :mod:`.state` (saving and resuming),
:mod:`.schedule` (:class:`CosineSchedule`), :mod:`.data` (slide pools, data loader, seeded
RNGs), :mod:`.report` (metrics, learning curve, :func:`export_model`).
"""

from __future__ import annotations

from .data import OPEN_SLIDE_OVERHEAD, TRAIN_CACHE_ENV, slide_pools, train_cache_budget
from .loop import train
from .options import TrainOptions, TrainResult
from .report import export_model, plot_learning_curve
from .schedule import CosineSchedule
from .state import STATE_DIR, STATE_FORMAT, STATE_JSON, load_training_state

__all__ = [
    "OPEN_SLIDE_OVERHEAD",
    "STATE_DIR",
    "STATE_FORMAT",
    "STATE_JSON",
    "TRAIN_CACHE_ENV",
    "CosineSchedule",
    "TrainOptions",
    "TrainResult",
    "export_model",
    "load_training_state",
    "plot_learning_curve",
    "slide_pools",
    "train",
    "train_cache_budget",
]
