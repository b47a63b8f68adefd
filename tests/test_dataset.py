"""The on-disk format, its validation, building, and the batch iterator."""

import json

import numpy as np
import pytest

from trm.config import DataConfig
from trm.data import dataset, sudoku


def test_built_sudoku_is_valid_encoded_and_test_is_disjoint(sudoku4_data):
    meta = dataset.read_metadata(sudoku4_data)
    assert meta["vocab_size"] == 6 and meta["seq_len"] == 16 and meta["splits"] == {"train": 600, "test": 64}
    train, test = dataset.load_split(sudoku4_data, "train"), dataset.load_split(sudoku4_data, "test")
    for split in (train, test):
        for q, a in zip(split.inputs, split.labels, strict=False):
            assert sudoku.is_solution(a.reshape(4, 4) - 1, q.reshape(4, 4).astype(int) - 1)
    train_q = {q.tobytes() for q in train.inputs[:300]}
    assert not train_q & {q.tobytes() for q in test.inputs}


def test_build_is_seeded_and_refuses_to_overwrite(tmp_path):
    cfg = DataConfig(size=4, num_train=20, num_test=5, augmentations=2, seed=7)
    a, b = dataset.build(cfg, tmp_path / "a"), dataset.build(cfg, tmp_path / "b")
    for key in ("inputs", "labels"):
        assert np.array_equal(np.load(a / "train" / f"{key}.npy"), np.load(b / "train" / f"{key}.npy"))
    before = (a / "train" / "inputs.npy").read_bytes()
    with pytest.raises(FileExistsError):
        dataset.build(cfg, a)
    assert (a / "train" / "inputs.npy").read_bytes() == before


def test_batch_maps_ignore_label():
    split = dataset.Split(np.array([[1, 2]], np.uint8), np.array([[0, 3]], np.uint8), np.array([0], np.int32))
    assert split.batch(np.array([0]))["labels"].tolist() == [[-100, 3]]


@pytest.fixture
def copy_of(sudoku4_data, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sudoku4_data, out)
    return out


def test_malformed_datasets_give_clear_errors(copy_of, tmp_path):
    with pytest.raises(dataset.DatasetError, match="no metadata.json"):
        dataset.read_metadata(tmp_path)
    np.save(copy_of / "test" / "inputs.npy", np.zeros((64, 15), np.uint8))
    with pytest.raises(dataset.DatasetError, match=r"inputs.npy has shape \(64, 15\)"):
        dataset.load_split(copy_of, "test")
    np.save(copy_of / "test" / "inputs.npy", np.full((64, 16), 9, np.uint8))
    with pytest.raises(dataset.DatasetError, match="token ids >= vocab_size"):
        dataset.load_split(copy_of, "test")
    np.save(copy_of / "test" / "labels.npy", np.zeros((64, 16), np.int64))
    with pytest.raises(dataset.DatasetError, match="labels.npy has dtype int64"):
        dataset.load_split(copy_of, "test")
    (copy_of / "train" / "puzzle_identifiers.npy").write_bytes(b"garbage")
    with pytest.raises(dataset.DatasetError, match="cannot read"):
        dataset.load_split(copy_of, "train")
    with pytest.raises(dataset.DatasetError, match="no split 'val'"):
        dataset.load_split(copy_of, "val")
    meta = json.loads((copy_of / "metadata.json").read_text())
    (copy_of / "metadata.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(dataset.DatasetError, match="format is 'other'"):
        dataset.read_metadata(copy_of)


def test_batch_iterator_is_deterministic_resumable_and_sharded(sudoku4_data):
    split = dataset.load_split(sudoku4_data, "train")
    it = dataset.BatchIterator(split, 128, seed=3)
    seen = [next(it)["inputs"] for _ in range(7)]  # crosses an epoch boundary (600 // 128 = 4)
    assert it.epoch == 1
    resumed = dataset.BatchIterator(split, 128, seed=3)
    resumed.load_state({"epoch": 0, "position": 3 * 128})
    for want in seen[3:]:
        assert np.array_equal(next(resumed)["inputs"], want)
    shards = [dataset.BatchIterator(split, 128, seed=3, rank=r, world_size=2) for r in range(2)]
    union = np.concatenate([next(s)["inputs"] for s in shards])
    assert sorted(map(bytes, union)) == sorted(map(bytes, seen[0]))


def test_batch_iterator_rejects_impossible_sizes(sudoku4_data):
    split = dataset.load_split(sudoku4_data, "test")
    with pytest.raises(ValueError, match="fewer than the global batch"):
        dataset.BatchIterator(split, 1000, seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        dataset.BatchIterator(split, 33, seed=0, world_size=2)
