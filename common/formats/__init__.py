"""A trained checkpoint in every format it can be exported to, side by side: speed and top-1
(``convnets benchmark --mode formats``). :mod:`~common.formats.runners` holds the registry of formats,
:mod:`~common.formats.measure` the timing, the accuracy and the table."""

from common.formats.measure import run_formats

__all__ = ["run_formats"]
