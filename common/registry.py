"""The model registry: small named constructors, each with the defaults that belong to that model.

Recipe folders (``resnet50/``, ``mobilenet/``, ``vgg/``) register their models with :func:`register_model`
when they are imported. The engine imports every recipe listed under the ``convnets.recipes`` entry-point
group (see ``pyproject.toml``), so shared code never names a model family.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch.nn as nn

from common.errors import UserError


def _checkout_recipes() -> list[str]:
    """Recipe modules of a source checkout run without ``pip install -e .``: every ``<folder>/models.py``
    beside ``common/``."""
    root = Path(__file__).resolve().parents[1]
    return sorted(f"{p.parent.name}.models" for p in root.glob("*/models.py") if p.parent.name != "common")


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about one registered model.

    Attributes:
        name: registry key, as given to ``--arch``.
        constructor: ``constructor(num_classes=..., **kwargs) -> nn.Module``; takes ``width_mult`` only when
            ``width_mults`` is set.
        recipe: the recipe folder the model belongs to (``resnet50``, ``mobilenet``, ...).
        image_size: default training/eval resolution.
        crop_fraction: eval crop over resize (224/256 for the ImageNet convention).
        head: dotted attribute path of the classifier layer (replaced for fine-tuning, kept trainable with
            ``--freeze-backbone``).
        width_mults: the width multipliers the model accepts, or None when it has none.
        torchvision_weights: name of the torchvision weights enum whose checkpoints load key for key
            (``"ResNet50_Weights"``), or None.
        description: one line for ``info --list``.
    """

    name: str
    constructor: Callable[..., nn.Module]
    recipe: str
    image_size: int = 224
    crop_fraction: float = 224 / 256
    head: str = "fc"
    width_mults: tuple[float, ...] | None = None
    torchvision_weights: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
_recipes_loaded = False


def register_model(name: str | None = None, **spec_fields) -> Callable:
    """Decorator that registers a constructor under ``name`` (default: the function's name).

    Refuses duplicate names, so two recipes can never silently shadow each other.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(
                f"model {key!r} is registered twice ({_REGISTRY[key].constructor.__module__} and {fn.__module__})"
            )
        recipe = spec_fields.pop("recipe", fn.__module__.split(".")[0])
        _REGISTRY[key] = ModelSpec(
            name=key,
            constructor=fn,
            recipe=recipe,
            description=(fn.__doc__ or "").strip().split("\n")[0],
            **spec_fields,
        )
        return fn

    return decorator


def load_recipes() -> None:
    """Import every recipe module once, so that its models are registered."""
    global _recipes_loaded
    if _recipes_loaded:
        return
    modules = [ep.value for ep in entry_points(group="convnets.recipes")] or _checkout_recipes()
    for module in modules:
        importlib.import_module(module)
    _recipes_loaded = True


def list_models() -> list[str]:
    """All registered model names, sorted by recipe then name."""
    load_recipes()
    return sorted(_REGISTRY, key=lambda k: (_REGISTRY[k].recipe, k))


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; a clear error naming close matches otherwise."""
    load_recipes()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown --arch {name!r}.{hint} `convnets info --list` shows every registered model.")
    return _REGISTRY[name]


def check_width_mult(spec: ModelSpec, width_mult: float | None) -> None:
    """Refuse ``--width-mult`` for models that have none, or a value the model does not define."""
    if width_mult is None:
        return
    if spec.width_mults is None:
        raise UserError(f"--width-mult {width_mult} given, but {spec.name} has no width multiplier")
    if width_mult not in spec.width_mults:
        allowed = ", ".join(str(w) for w in spec.width_mults)
        raise UserError(f"--width-mult {width_mult} is not defined for {spec.name} (choose from {allowed})")


def create_model(name: str, num_classes: int = 1000, width_mult: float | None = None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier."""
    spec = get_model_spec(name)
    check_width_mult(spec, width_mult)
    if width_mult is not None:
        kwargs["width_mult"] = width_mult
    return spec.constructor(num_classes=num_classes, **kwargs)
