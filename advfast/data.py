"""The documented import paths of the datasets (``advfast.data.digits``) and of generate's
output reader (``advfast.data.AdversarialDataset``); they live in :mod:`advfast.io`."""

from advfast.io.datasets import DIGITS_SPLITS, ImageFiles, Sample, digits, digits_split_indices
from advfast.io.reader import AdversarialDataset

__all__ = ["DIGITS_SPLITS", "AdversarialDataset", "ImageFiles", "Sample", "digits",
           "digits_split_indices"]
