"""Every ImageNet on-disk format yields the same images and labels; bad data fails clearly."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from conftest import CLASSES, encode, synthetic_set
from quantship.config import PreprocessSpec
from quantship.data.classes import wnid_to_label
from quantship.data.datasets import Skipped, check_disjoint, iter_batches, load_dataset, split_calibration
from quantship.errors import ConfigError, DataError

# A devkit numbering for our three synsets that differs from the sorted-wnid label order, so a loader
# that ignored the mapping would get the labels wrong.
DEVKIT_IDS = {CLASSES[0]: 7, CLASSES[1]: 3, CLASSES[2]: 5}


@pytest.fixture(scope="module")
def images():
    x, y = synthetic_set(3, seed=3)
    order = np.random.default_rng(0).permutation(len(y))
    blobs = [encode(x[i]) for i in order]
    return blobs, [int(y[i]) for i in order]


def _flat(root, blobs):
    val = root / "val"
    val.mkdir()
    names = []
    for i, b in enumerate(blobs):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        (val / name).write_bytes(b)
        names.append(name)
    return val, names


def make_devkit_mat(root, blobs, labels):
    from scipy.io import savemat

    val, _ = _flat(root, blobs)
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{DEVKIT_IDS[CLASSES[lab]]}\n" for lab in labels)
    )
    dt = np.dtype([("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    synsets = np.array([(DEVKIT_IDS[w], w, 0) for w in CLASSES] + [(1001, "n00000001", 3)], dtype=dt)
    (root / "data").mkdir()
    savemat(root / "data" / "meta.mat", {"synsets": synsets})
    return val, None


def make_devkit_map(root, blobs, labels):
    val, _ = _flat(root, blobs)
    gt = root / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{DEVKIT_IDS[CLASSES[lab]]}\n" for lab in labels))
    (root / "map_clsloc.txt").write_text("".join(f"{w} {i} name_{i}\n" for w, i in DEVKIT_IDS.items()))
    return val, gt


def make_loc_csv(root, blobs, labels):
    val, names = _flat(root, blobs)
    rows = ["ImageId,PredictionString"] + [
        f"{n.rsplit('.', 1)[0]},{CLASSES[lab]} 1 2 30 40 {CLASSES[lab]} 5 6 7 8" for n, lab in zip(names, labels)
    ]
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return val, None


def make_file_label_index(root, blobs, labels):
    val, names = _flat(root, blobs)
    (val / "val.txt").write_text("".join(f"{n} {wnid_to_label()[CLASSES[lab]]}\n" for n, lab in zip(names, labels)))
    return val, None


def make_file_label_wnid(root, blobs, labels):
    val, names = _flat(root, blobs)
    gt = root / "my_labels.txt"
    gt.write_text("".join(f"{n} {CLASSES[lab]}\n" for n, lab in zip(names, labels)))
    return val, gt


def make_synset_folders(root, blobs, labels):
    for i, (b, lab) in enumerate(zip(blobs, labels)):
        d = root / "val" / CLASSES[lab]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.JPEG").write_bytes(b)
    return root / "val", None


def make_val224(root, blobs, labels):
    path = root / "val224_compressed.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {
                "data": [np.frombuffer(b, np.uint8) for b in blobs],
                "target": [wnid_to_label()[CLASSES[lab]] for lab in labels],
            },
            f,
            protocol=2,
        )
    return path, None


FORMATS = [
    make_devkit_mat,
    make_devkit_map,
    make_loc_csv,
    make_file_label_index,
    make_file_label_wnid,
    make_synset_folders,
    make_val224,
]


@pytest.mark.parametrize("make", FORMATS, ids=[f.__name__[5:] for f in FORMATS])
def test_every_format_gives_same_images_and_labels(tmp_path, images, make):
    blobs, labels = images
    expected = {hashlib.sha256(b).hexdigest(): wnid_to_label()[CLASSES[lab]] for b, lab in zip(blobs, labels)}
    path, gt = make(tmp_path, blobs, labels)
    ds = load_dataset(f"imagenet:{path}", labels=gt)
    got = {hashlib.sha256(s.read()).hexdigest(): s.label for s in ds.samples}
    assert got == expected
    spec = PreprocessSpec(size=(24, 24), crop_pct=1.0)
    batches = list(iter_batches(ds, spec, batch_size=4, workers=2))
    assert sum(len(b.keys) for b in batches) == len(blobs)
    assert batches[0].inputs.shape[1:] == (1, 24, 24, 3)


def test_missing_ground_truth_is_clear(tmp_path, images):
    val, _ = _flat(tmp_path, images[0])
    with pytest.raises(DataError, match="no ground truth found.*--labels"):
        load_dataset(f"imagenet:{val}")


def test_devkit_ids_without_meta_is_clear(tmp_path, images):
    val, _ = _flat(tmp_path, images[0])
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("".join("1\n" for _ in images[0]))
    with pytest.raises(DataError, match="meta.mat"):
        load_dataset(f"imagenet:{val}")


def test_label_missing_for_an_image(tmp_path, images):
    val, names = _flat(tmp_path, images[0])
    (val / "val.txt").write_text("".join(f"{n} 1\n" for n in names[:-1]))
    with pytest.raises(DataError, match=f"no label for 1 image.*{names[-1]}"):
        load_dataset(f"imagenet:{val}")


def test_malformed_label_line_names_file_and_line(tmp_path, images):
    val, names = _flat(tmp_path, images[0])
    (val / "val.txt").write_text(f"{names[0]} 1\n{names[1]} banana\n")
    with pytest.raises(DataError, match=r"val.txt:2"):
        load_dataset(f"imagenet:{val}")


def test_unknown_kind_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        load_dataset("cifar:/x")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"imagenet:{tmp_path / 'nope'}")


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path, images):
    blobs, labels = images
    path, _ = make_synset_folders(tmp_path, blobs, labels)
    bad1 = path / CLASSES[0] / "broken.JPEG"
    bad1.write_bytes(b"this is not an image")
    bad2 = path / CLASSES[1] / "cut.JPEG"
    bad2.write_bytes(blobs[0][: len(blobs[0]) // 2])
    ds = load_dataset(f"imagenet:{path}")
    skipped: list[Skipped] = []
    n = sum(len(b.keys) for b in iter_batches(ds, PreprocessSpec(size=(16, 16)), 4, 2, skipped))
    assert n == len(blobs)
    reasons = {s.key.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert set(reasons) == {"broken.JPEG", "cut.JPEG"}
    assert "truncated" in reasons["cut.JPEG"]


def test_calibration_split_is_disjoint_and_refuses_overlap(tmp_path, images):
    blobs, labels = images
    path, _ = make_synset_folders(tmp_path, blobs, labels)
    ds = load_dataset(f"imagenet:{path}")
    calib, ev = split_calibration(ds, 3, limit=4, seed=1)
    assert len(calib) == 3 and len(ev) == 4
    assert not {s.key for s in calib.samples} & {s.key for s in ev.samples}
    with pytest.raises(DataError, match="also evaluation images"):
        check_disjoint(ds.subset([0, 1]), ds.subset([1, 2]))
    # The same bytes under another name (a copy in another folder) are caught too.
    copy = tmp_path / "copy" / CLASSES[0]
    copy.mkdir(parents=True)
    (copy / "dup.JPEG").write_bytes(ds.samples[0].read())
    other = load_dataset(f"imagenet:{tmp_path / 'copy'}")
    with pytest.raises(DataError, match="disjoint"):
        check_disjoint(other, ds)
    with pytest.raises(DataError, match="fewer|asked"):
        split_calibration(ds, 5, limit=len(ds))
