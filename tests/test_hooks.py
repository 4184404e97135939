import pytest

from emolens.model.hooks import check_layers, resid_post


def test_layer_lists_accept_all_negative_and_mid():
    assert check_layers("all", 4) == [0, 1, 2, 3]
    assert check_layers("mid,-1", 6) == [3, 5]
    assert check_layers([0, -2], 4) == [0, 2]
    assert resid_post(3) == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    "bad, message",
    [("9", "out of range"), ([1, 1], "twice"), ("one", "cannot read"), ([-5], "out of range")],
)
def test_bad_layer_lists_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        check_layers(bad, 4)
