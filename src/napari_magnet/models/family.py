"""The model-family seam: one record per family, and the registry that holds them.

A *family* (MagNet, attention sampling, …) is everything the rest of the project needs to
know about one kind of model: how to rebuild it from a checkpoint's config, its named
configurations, how it runs through ``magnify`` and how it trains. ``magnify``, ``train``,
``evaluate``, the CLI and the widget ask the family of a model (:func:`family_of`) and never
name one. Each family lives in its own folder under ``models/`` and registers itself with
:func:`register_family` when imported; ``models/__init__`` imports the built-in ones.

This is a leaf module: it imports nothing of the project's, so any module may import it.

The contracts, in words (the types are kept loose so that this module stays a leaf):

``build(config: Mapping) -> nn.Module``
    An untrained model from a checkpoint's ``config``; raises ``ValueError``/``TypeError``
    for a config it cannot build. The model has ``architecture`` (the family's name) and
    ``config`` (with ``to_dict()``, ``config_hash()`` and ``name``).
``configs: Mapping[str, () -> nn.Module]``
    Named, randomly initialised models (``load_model`` seeds the call).
``magnify(model, reader, frame, visible, device, options) -> Generator``
    The body of :func:`napari_magnet.engine.magnify.magnify`: yields ``MagnifyStep`` records
    and returns a ``MagnifyResult`` (``seconds`` and ``pixels_read`` are filled in by the
    engine). ``reader`` is the engine's ``RegionReader``, ``frame``/``visible`` the level-0
    ``(1, 4)`` square frame and visible box of the start region, ``options`` a
    ``MagnifyOptions``.
``training_task(model, options, device) -> task``
    The object the trainer drives (see :class:`TrainingTask`), or ``None`` for a family that
    cannot be trained from slides.
``expected_steps(model) -> int``
    How many ``MagnifyStep`` records a run yields (for progress displays).
``final_layer(model) -> int``
    The step whose regions are the run's final ROIs (those the slide prediction rests on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Family",
    "TrainOption",
    "TrainingTask",
    "families",
    "family_of",
    "get_family",
    "named_config",
    "register_family",
    "unregister_family",
]


class TrainingTask(Protocol):
    """What the trainer drives for one family (built by ``Family.training_task``).

    Attributes
    ----------
    model : nn.Module
        The model being trained.
    device : torch.device
        Where it trains.
    sizes : tuple of int
        Sizes (px) of the square renderings of each slide's start frame that the data loader
        prepares per slide (``images[k]`` of a batch is ``(B, 3, sizes[k], sizes[k])`` uint8).
    optimizers : dict of str to torch.optim.Optimizer
        Saved and restored by name with the training state.
    schedule_enabled : bool
        Whether the learning rate follows the cosine schedule (else the trainer leaves it as
        the task sets it: constant, or changed by the task's ``end_epoch``).

    Optional members (the trainer looks for them with ``getattr``; a task without them gets
    the behaviour in brackets):

    ``reads_slides: bool`` [True]
        False for a task that reads no pixels (a model trained from feature bags, with empty
        ``sizes``): no slide is opened, and ``loss`` gets a batch holding only ``records``,
        ``ops`` and ``reader_pool`` instead of a ``SlideBatch``.
    ``epoch_order(labels, rng) -> list[int]`` [a uniform permutation]
        The training slides of one epoch, as indices into the training split (repeats
        allowed, e.g. class-weighted draws with replacement); ``labels`` is the split's
        ``(n,)`` int array, ``rng`` a ``numpy.random.Generator`` seeded by ``(seed, epoch)``
        so a resumed run draws what an uninterrupted one would have. Draw only from ``rng``.
    ``end_epoch(metrics: dict) -> None`` [nothing]
        Called after each epoch's validation with the epoch's ``metrics.csv`` row
        (``train_loss``, ``val_loss`` — NaN without validation —, ``val_auroc``, ``lr`` …),
        before the training state is saved: e.g. a plateau rule lowering the learning rate,
        whose state belongs in ``extra_state``.
    """

    model: Any
    device: Any
    sizes: tuple[int, ...]
    optimizers: dict[str, Any]
    schedule_enabled: bool

    def default_batch_size(self) -> int:
        """Slides per step when the user gives none."""

    def loss(
        self, images: list, labels: Any, batch: Any, generator: Any, amp: bool
    ) -> tuple[Any, dict[str, float], Any]:
        """``(loss, {part: value}, probabilities (B,))`` of one batch (a ``SlideBatch``; with
        ``reads_slides`` false, the records only)."""

    def backward_step(self, loss: Any, scaler: Any, schedule: Any) -> None:
        """Back-propagate ``loss`` and step the optimizers and the schedule."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-safe state besides the optimizers' (saved with the training state)."""

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""


@dataclass(frozen=True)
class TrainOption:
    """A training option of one family: ``napari-magnet train --<name with dashes>``.

    The trainer passes its value to the family's task as ``options.family_options[name]``
    (the default when not given).

    Attributes
    ----------
    name : str
        Python name, e.g. ``"ats_learning"`` (the flag is ``--ats-learning``).
    default : object
        Value when the option is not given.
    help : str
        One line for ``--help``.
    type : callable
        Converts the command-line text.
    choices : tuple, optional
        The values allowed.
    """

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[Any, ...] | None = None


def _one_step(model: Any) -> int:
    return 1


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring for the callables' contracts).

    Attributes
    ----------
    architecture : str
        The name checkpoints record (``"magnet"``, ``"ats"``, …).
    config_class : type
        Its configuration dataclass.
    build : callable
        Checkpoint config dict → untrained model.
    configs : mapping of str to callable
        Named configurations, in the order the widget lists them.
    magnify : callable
        The family's run through ``magnify``.
    training_task : callable or None
        Builds the trainer's task; ``None`` when the family cannot be trained.
    adjustable_patches : bool
        Whether ``magnify(n_patches=…)`` (the widget's Patches box) applies.
    expected_steps : callable
        Model → number of ``MagnifyStep`` records a run yields.
    final_layer : callable, optional
        Model → the step holding the final ROIs; the last step when omitted.
    train_options : tuple of TrainOption
        Options of the family's training (``napari-magnet train`` flags).
    order : int
        Listing order among families (lower first).
    description : str
        One line for users (CLI help, widget tooltips).
    """

    architecture: str
    config_class: type
    build: Callable[[Mapping[str, Any]], Any]
    configs: Mapping[str, Callable[[], Any]]
    magnify: Callable[..., Iterator[Any]]
    training_task: Callable[[Any, Any, Any], TrainingTask] | None = None
    adjustable_patches: bool = False
    expected_steps: Callable[[Any], int] = _one_step
    final_layer: Callable[[Any], int] | None = None
    train_options: tuple[TrainOption, ...] = ()
    order: int = 100
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def last_layer(self, model: Any) -> int:
        """The step whose regions are ``model``'s final ROIs."""
        if self.final_layer is not None:
            return int(self.final_layer(model))
        return int(self.expected_steps(model))


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, overwrite: bool = False) -> Family:
    """Register ``family``; returns it.

    Raises
    ------
    ValueError
        Its architecture, or one of its config names, is taken by another family (unless
        ``overwrite``), or a name is empty or ``"demo"`` (reserved for the shipped model).
    """
    name = family.architecture
    if not name or not isinstance(name, str):
        raise ValueError("a family's architecture must be a non-empty string")
    if name in _FAMILIES and _FAMILIES[name] is not family and not overwrite:
        raise ValueError(f"model family {name!r} is already registered")
    for config in family.configs:
        if not config or not isinstance(config, str):
            raise ValueError(f"family {name!r}: config names must be non-empty strings")
        if config == "demo":
            raise ValueError("'demo' is reserved for the shipped checkpoint")
        other = _config_owner(config)
        if other is not None and other.architecture != name and not overwrite:
            raise ValueError(
                f"model {config!r} is already registered by family {other.architecture!r}"
            )
    _FAMILIES[name] = family
    return family


def unregister_family(architecture: str) -> None:
    """Remove a family (a no-op when it is not registered)."""
    _FAMILIES.pop(architecture, None)


def families() -> list[Family]:
    """The registered families in listing order."""
    return sorted(_FAMILIES.values(), key=lambda f: (f.order, f.architecture))


def get_family(architecture: str) -> Family:
    """The family of ``architecture``.

    Raises
    ------
    KeyError
        No such family; the message lists the known ones.
    """
    try:
        return _FAMILIES[architecture]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise KeyError(f"unknown model family {architecture!r} (known: {known})") from None


def family_of(model: Any) -> Family:
    """The family of a model from ``load_model`` (by its ``architecture`` attribute).

    Raises
    ------
    TypeError
        The object is not a model of a registered family.
    """
    architecture = getattr(model, "architecture", None)
    if not isinstance(architecture, str) or architecture not in _FAMILIES:
        raise TypeError(
            f"{type(model).__name__} is not a model of a registered family "
            f"(architecture {architecture!r}); load it with load_model"
        )
    return _FAMILIES[architecture]


def _config_owner(name: str) -> Family | None:
    for family in _FAMILIES.values():
        if name in family.configs:
            return family
    return None


def named_config(name: str) -> tuple[Family, Callable[[], Any]] | None:
    """``(family, factory)`` of a named configuration, or ``None``."""
    family = _config_owner(name)
    return None if family is None else (family, family.configs[name])
