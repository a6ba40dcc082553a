"""A broken splits.json and a checkpoint that diffseg did not write: one error naming the file and what
was expected (the scripts print these errors as one ``error:`` message, tests/integration)."""
from __future__ import annotations

import json

import pytest
import torch

from diffseg.data.datamodule import load_or_make_splits
from diffseg.data.errors import DataError
from diffseg.utils.checkpoint import read_checkpoint
from diffseg.utils.errors import ConfigError


class _Case:
    def __init__(self, cid):
        self.id = cid


CASES = [_Case(f"case_{i}") for i in range(6)]


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"train": [], "val": []}), "missing ['test']"),
    (json.dumps({"train": ["case_99"], "val": [], "test": []}), "case_99"),
    (json.dumps({"train": ["case_0", "case_1"], "val": ["case_1"], "test": []}), "in both 'train' and 'val'"),
])
@pytest.mark.parametrize("where", ["splits_file", "root"])
def test_broken_splits_file_is_named(content, needle, where, tmp_path):
    path = tmp_path / ("my_splits.json" if where == "splits_file" else "splits.json")
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_or_make_splits(CASES, tmp_path, (0.6, 0.2, 0.2), seed=0,
                            splits_file=str(path) if where == "splits_file" else None)
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)


def test_missing_splits_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data.splits_file=.*nope.json: no such file"):
        load_or_make_splits(CASES, tmp_path, (0.6, 0.2, 0.2), seed=0, splits_file=str(tmp_path / "nope.json"))


@pytest.mark.parametrize("kind,expected", [("foreign", "has no diffseg config"),
                                           ("not_a_checkpoint", "not a readable checkpoint"),
                                           ("missing", "no such checkpoint")])
def test_foreign_checkpoint_is_named(kind, expected, tmp_path):
    path = tmp_path / "model.ckpt"
    if kind == "foreign":  # a Lightning checkpoint of some other project: weights but no diffseg config
        torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3}, path)
    elif kind == "not_a_checkpoint":
        path.write_text("these are not the weights you are looking for\n")
    with pytest.raises(ConfigError) as err:
        read_checkpoint(path)
    assert f"ckpt={path}" in str(err.value) and expected in str(err.value), str(err.value)
