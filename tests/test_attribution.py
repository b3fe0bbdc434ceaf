"""utils.attribution against hand-worked gradients and integrated gradients' completeness."""

import pytest
import torch
from torch import nn

from utils.attribution import input_x_gradient, integrated_gradients, replaced_output

torch.manual_seed(0)
X = torch.randn(5, 4)
W = torch.randn(5, 4)


def linear(points):  # (N, T, E) -> (N,): score = sum of W * x, gradient W everywhere
    return (points * W).sum((1, 2))


def smooth(points):  # a nonlinear score: tanh of a weighted sum plus a square
    return torch.tanh((points * W).sum((1, 2))) + 0.3 * (points[:, :, 0] ** 2).sum(1)


def test_input_x_gradient_of_a_linear_model_is_x_times_its_weights():
    torch.testing.assert_close(input_x_gradient(linear, X), (X * W).sum(-1), atol=1e-6, rtol=0)


def test_input_x_gradient_matches_autograd_on_a_nonlinear_model():
    x = X.clone().requires_grad_(True)
    smooth(x[None]).sum().backward()
    expected = (X * x.grad).sum(-1)
    torch.testing.assert_close(input_x_gradient(smooth, X), expected, atol=1e-6, rtol=0)


def test_integrated_gradients_of_a_linear_model_is_exact_for_any_steps():
    baseline = torch.randn(5, 4)
    expected = ((X - baseline) * W).sum(-1)
    for steps in (1, 7):
        got = integrated_gradients(linear, X, baseline, steps=steps)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_integrated_gradients_completeness():
    baseline = torch.zeros(5, 4)
    gap = (smooth(X[None]) - smooth(baseline[None])).item()
    coarse = integrated_gradients(smooth, X, baseline, steps=4).sum().item()
    fine = integrated_gradients(smooth, X, baseline, steps=256).sum().item()
    assert abs(fine - gap) < 1e-4  # midpoint rule: error falls as 1/steps^2
    assert abs(fine - gap) < abs(coarse - gap)


def test_replaced_output_feeds_embeddings_to_a_model_of_ids():
    embedding = nn.Embedding(10, 4)
    model = nn.Sequential(embedding, nn.Flatten(), nn.Linear(12, 1))
    ids = torch.tensor([[1, 2, 3]])
    with replaced_output(embedding, embedding(ids).detach() * 0):
        zero_input = model(ids)
    torch.testing.assert_close(zero_input, model[2].bias.detach()[None], atol=1e-6, rtol=0)
    assert not embedding._forward_hooks  # the hook is removed on exit


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: input_x_gradient(linear, X[None]), "x must be one example"),
        (lambda: input_x_gradient(linear, torch.ones(5, 4, dtype=torch.long)), "floating"),
        (lambda: integrated_gradients(linear, X, X[:2]), "baseline must have"),
        (lambda: integrated_gradients(linear, X, X, steps=0), "steps must be"),
        (lambda: input_x_gradient(lambda p: p.sum(-1), X), "one score per row"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
