import pytest

from emolens.model.hooks import check_layers, resid_post


def test_layer_lists_accept_all_negative_and_mid():
    assert check_layers("all", 4) == [0, 1, 2, 3]
    assert check_layers("mid,-1", 6) == [3, 5]
    assert check_layers([0, -2], 4) == [0, 2]
    assert resid_post(3) == "blocks.3.hook_out"


@pytest.mark.parametrize(
    "bad, message",
    [("9", "out of range"), ([1, 1], "twice"), ("one", "cannot read"), ([-5], "out of range")],
)
def test_bad_layer_lists_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        check_layers(bad, 4)


def test_tl4_names_are_the_hook_points_of_the_deprecated_aliases(tiny_model):
    """Each name emolens uses is TL 4's own and caches the tensors its HookedTransformer alias
    gives, at every layer."""
    import torch

    from emolens.model import hooks

    bridge = tiny_model.bridge
    layers = range(tiny_model.n_layers)
    pairs = [
        (pattern.format(layer=layer), alias.format(layer=layer))
        for pattern, alias in hooks.ALIASES.items()
        for layer in (layers if "{layer}" in pattern else [0])
    ]
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        _, new = bridge.run_with_cache(ids, names_filter=[n for n, _ in pairs])
        _, old = bridge.run_with_cache(ids, names_filter=[a for _, a in pairs])
    for name, alias in pairs:
        assert name in bridge.hook_dict and alias in bridge.hook_dict
        assert name not in (a.format(layer=0) for a in hooks.ALIASES.values())
        torch.testing.assert_close(new[name], old[alias], atol=0, rtol=0)
    assert hooks.resid_post(1) == hooks.RESID_POST.format(layer=1)
    assert hooks.manifest_names()["steering"] == hooks.RESID_POST
