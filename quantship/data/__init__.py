"""Datasets (ImageNet, VOC, COCO, image folders) by kind, preprocessing, and the decoded-input cache.

The public names, by module (imported on first use, so importing one module never loads its siblings):

- :mod:`~quantship.data.datasets`: ImageDataset, load_dataset, iter_batches, split_calibration
- :mod:`~quantship.data.cache`: InputCache, configure
"""

from __future__ import annotations

from quantship.lazy import public_attributes

_PUBLIC = {
    "ImageDataset": "quantship.data.datasets",
    "InputCache": "quantship.data.cache",
    "configure": "quantship.data.cache",
    "iter_batches": "quantship.data.datasets",
    "load_dataset": "quantship.data.datasets",
    "split_calibration": "quantship.data.datasets",
}
__all__ = sorted(_PUBLIC)
__getattr__ = public_attributes(__name__, _PUBLIC)
