"""The 1000 ImageNet-1k classes, bundled (label order = sorted WordNet ids, as Keras and TF use)."""

from __future__ import annotations

import functools
from importlib import resources


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """((wnid, lemmas), ...) in label order."""
    text = resources.files("quantship.data").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            wnid, lemmas = line.split("\t", 1)
            rows.append((wnid.strip(), lemmas.strip()))
    assert len(rows) == 1000, "bundled class list is damaged"
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def wnid_to_label() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def class_name(label: int) -> str:
    """Short human name of a label (first lemma), e.g. 281 -> 'tabby'."""
    return imagenet_classes()[label][1].split(",")[0].strip()
