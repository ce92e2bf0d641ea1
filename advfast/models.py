"""The documented import path of :mod:`advfast.io.models` (``advfast.models.load``)."""

from advfast.io.models import (DigitsNet, Normalized, cache_dir, fingerprint, fit, input_channels,
                               load, read_state_dict, train_digits)

__all__ = ["DigitsNet", "Normalized", "cache_dir", "fingerprint", "fit", "input_channels", "load",
           "read_state_dict", "train_digits"]
