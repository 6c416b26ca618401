r"""Custom ``torch.autograd.Function``\ s for the tests of unsupported ops (tests/test_autodiff.py, the
callback's tests): each breaks one kind of differentiation, and :class:`Act` / :class:`CustomNet` apply one
inside a model."""

import torch
from torch import Tensor, nn


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)


class BrokenBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("BrokenBackward cannot differentiate")


class OldStyle(torch.autograd.Function):
    """A correct backward, but no setup_context: torch.func refuses it, eager autograd does not."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class DetachedBackward(torch.autograd.Function):
    """A correct gradient whose own derivative is wrong (the saved output is detached)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y.detach() ** 2)

    @staticmethod
    def vmap(info, in_dims, x):
        return DetachedBackward.apply(x), in_dims[0]


class Act(nn.Module):
    def __init__(self, fn: type) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn.apply(x)


class CustomNet(nn.Module):
    def __init__(self, fn: type) -> None:
        super().__init__()
        self.lin, self.act, self.head = nn.Linear(3, 5), Act(fn), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.lin(x)))
