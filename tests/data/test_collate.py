"""DPCollate: the row-to-item map of multi-row items, and the marker of an empty Poisson batch."""

from __future__ import annotations

import pytest
import torch
from monai.data import list_data_collate

from monai_dp.data.collate import (
    EMPTY_BATCH_KEY,
    GROUP_KEY,
    DPCollate,
    GroupedBatch,
    get_row_groups,
    is_empty_batch,
)


def _rec(v):
    return {"image": torch.full((1, 2, 2), float(v)), "label": torch.tensor(v)}


def test_multi_crop_items_map_every_row_to_its_item():
    items = [[_rec(0), _rec(1), _rec(2)], [_rec(3)], [_rec(4), _rec(5)]]  # e.g. RandCropByPosNegLabeld outputs
    batch = DPCollate(list_data_collate)(items)
    assert batch["image"].shape == (6, 1, 2, 2)
    assert batch[GROUP_KEY].tolist() == [0, 0, 0, 1, 2, 2]
    assert batch["label"].tolist() == [0, 1, 2, 3, 4, 5]  # rows in item order, so the map lines up
    assert get_row_groups(batch) is batch[GROUP_KEY]
    assert not is_empty_batch(batch)


def test_one_row_per_item_by_default():
    batch = DPCollate()([_rec(i) for i in range(3)])
    assert batch[GROUP_KEY].tolist() == [0, 1, 2]


def test_empty_batch_is_a_marker():
    batch = DPCollate(list_data_collate)([])
    assert batch == {EMPTY_BATCH_KEY: True} and is_empty_batch(batch)
    assert not is_empty_batch({EMPTY_BATCH_KEY: False}) and not is_empty_batch([torch.zeros(1)])


def test_tuple_batches_carry_the_map_as_an_attribute():
    items = [[(torch.zeros(2), 0), (torch.ones(2), 1)], [(torch.ones(2), 2)]]
    batch = DPCollate()(items)
    assert isinstance(batch, GroupedBatch) and batch[0].shape == (3, 2)
    assert get_row_groups(batch).tolist() == [0, 0, 1]


def test_wrapping_twice_does_not_nest_and_odd_outputs_are_refused():
    inner = DPCollate(list_data_collate)
    assert DPCollate(inner).collate_fn is list_data_collate
    assert get_row_groups(torch.zeros(2)) is None
    one_row = DPCollate(lambda items: torch.stack(items))([torch.zeros(2), torch.ones(2)])
    assert isinstance(one_row, torch.Tensor)  # one row per item: the trainer's default map is right
    with pytest.raises(TypeError, match=r"`collate_fn output` must be a dict or a sequence of tensors, got 'Tensor'"):
        DPCollate(lambda items: torch.stack(items))([[torch.zeros(2), torch.ones(2)]])
