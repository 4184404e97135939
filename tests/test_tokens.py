import pytest
import torch

from emolens.data.tokens import last_token_index, pad


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_index_finds_the_last_real_token_on_either_side(side):
    ids, mask = pad([[5, 6, 7], [8], [1, 2]], pad_token_id=0, side=side)
    last = last_token_index(mask)
    assert ids[torch.arange(3), last].tolist() == [7, 8, 2]
    assert mask.sum(1).tolist() == [3, 1, 2]


def test_pad_rejects_empty_and_unknown_side():
    with pytest.raises(ValueError, match="empty"):
        pad([[1], []], 0)
    with pytest.raises(ValueError, match="side"):
        pad([[1]], 0, side="middle")
