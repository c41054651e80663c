"""Cold items added to a trained run's semantic IDs, prefix tree and dense head (``generator.runs.cold_items``).

The dataset-splitting tests are in tests/test_semid_coldstart.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.models.dense import DenseHead, DenseHeadConfig
from generator.runs.cold_items import add_cold_items
from semid.ids import SemanticIDs


def test_add_cold_items_to_ids_tree_and_head() -> None:
    ids = SemanticIDs.from_codes(np.array([[0, 1], [0, 1], [2, 3]]), (4, 4), extra_level_size=4)
    layout = ids.layout(num_user_tokens=0)
    head = DenseHead(DenseHeadConfig(input_dim=4, dim=3, mode="content"), torch.arange(1, 4), torch.randn(3, 5))

    def encode(x: np.ndarray) -> np.ndarray:  # a stand-in quantizer: codes from the sign of two coordinates
        return np.stack([(x[:, 0] > 0) * 2, (x[:, 1] > 0) * 3], axis=1).astype(np.int64)

    content = np.array([[-1.0, 1.0, 0, 0, 0], [1.0, 1.0, 0, 0, 0]], dtype=np.float32)
    cat = add_cold_items(ids, layout, content, np.array([4, 5]), encode=encode, head=head)
    assert cat.ids.codes_of(np.array([4, 5])).tolist() == [[0, 3, 0], [2, 3, 1]]  # item 5 collides with item 3
    tokens = torch.from_numpy(np.asarray(layout.codes_to_tokens(cat.ids.codes_of(np.array([4, 5])))))
    assert cat.tree.lookup(tokens).tolist() == [4, 5]
    assert cat.head is head and head.num_items == 5
    with pytest.raises(ValueError, match=r"`encode` must return codes of shape \(2, 2\)"):
        add_cold_items(ids, layout, content, np.array([4, 5]), encode=lambda x: np.zeros((2, 3), np.int64))
