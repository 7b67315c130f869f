"""The recipe search's closed-form per-example gradient norms equal per-example gradients of the bundle's head.

``benchmarks/fashion_mnist_search.py`` clips with norms computed in closed form for GroupNorm (affine) + linear;
the reference is ``torch.func`` per-example gradients of ``monai_dp.networks.FeatureClassifier`` (the head the
bundle trains) on the raw features, and of the mean loss over two views for the multi-view form.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from monai_dp.networks import FeatureClassifier

BENCHMARK = "fashion_mnist_search"


@pytest.fixture(scope="module")
def search(benchmark_module):
    return benchmark_module


def _head_and_params(seed: int = 0):
    torch.manual_seed(seed)
    head = FeatureClassifier([81, 7, 7], 10, norm_groups=27)
    with torch.no_grad():  # non-trivial affine weights, so every term of the norm matters
        head.net[0].weight.uniform_(0.5, 1.5)
        head.net[0].bias.normal_(0, 0.3)
        head.net[2].weight.normal_(0, 0.05)
        head.net[2].bias.normal_(0, 0.1)
    p = dict(head.named_parameters())
    mine = {"g": p["net.0.weight"].detach(), "b": p["net.0.bias"].detach(), "W": p["net.2.weight"].detach(),
            "c": p["net.2.bias"].detach()}
    return head, {k: v.detach() for k, v in p.items()}, mine


def _reference_norms(head, params, views, y, label_smoothing):
    def loss(pp, xs, target):
        out = functional_call(head, pp, (xs,))  # xs: (views, 81, 7, 7): the mean loss over the views
        return torch.nn.functional.cross_entropy(out, target.expand(len(xs)), label_smoothing=label_smoothing)

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, torch.stack(views, 1), y)
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in gs.values()))


@pytest.mark.parametrize("num_views", [1, 2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_closed_form_norms_equal_per_example_gradients(search, num_views, label_smoothing):
    head, params, mine = _head_and_params()
    raw = [torch.rand(12, 81, 7, 7) ** 3 for _ in range(num_views)]  # skewed, like scattering coefficients
    y = torch.randint(0, 10, (12,))
    norms, logits = search.linear_head_norms(mine, [search.group_normalise(r) for r in raw], y, label_smoothing)
    expected = _reference_norms(head, params, raw, y, label_smoothing)
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits[0], head(raw[0]), rtol=1e-4, atol=1e-5)
    assert expected.std() > 0.05 * expected.mean()  # examples differ, so a norm shared by the batch would fail


def test_group_normalise_is_group_norm_without_affine(search):
    raw = torch.rand(5, 81, 7, 7) ** 2
    torch.testing.assert_close(search.group_normalise(raw), torch.nn.functional.group_norm(raw, 27).reshape(5, 81, 49),
                               rtol=1e-4, atol=1e-5)


def test_projected_head_norms_equal_per_example_gradients_of_its_linear_layer(search):
    from monai_dp.networks import ProjectedFeatureClassifier

    torch.manual_seed(1)
    head = ProjectedFeatureClassifier([81, 7, 7], 10, norm_groups=27, components=50)
    head.release_statistics(torch.rand(200, 81, 7, 7) ** 3, noise_multiplier=1e-6, noise_seed=0)
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.3)
    raw, y = torch.rand(12, 81, 7, 7) ** 3, torch.randint(0, 10, (12,))
    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss(pp, x, target):
        return torch.nn.functional.cross_entropy(functional_call(head, pp, (x[None],)), target[None])

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, raw, y)
    expected = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in gs.values()))
    with torch.no_grad():
        norms, _ = search.projected_head_norms({"W": params["linear.weight"], "c": params["linear.bias"]},
                                               head.project(raw), y)
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-6)
    assert expected.std() > 0.05 * expected.mean()
