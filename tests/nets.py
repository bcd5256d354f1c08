"""Model factories the tests name by import path ("tests.nets:..."), as a user's package would:
one of every layer kind the masking rules cover."""

from __future__ import annotations

from torch import nn


class Recurrent(nn.Module):
    """GRU or LSTM over (N, channels, steps) windows, classifying from the last hidden state."""

    def __init__(self, input_shape, num_outputs, cell="gru", hidden=16):
        super().__init__()
        channels = input_shape[0]
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(out[:, -1])


def recurrent(input_shape, num_outputs, cell="gru", hidden=16):
    return Recurrent(input_shape, num_outputs, cell, hidden)


def depthwise(input_shape, num_outputs, width=16):
    """A MobileNet-style block: depthwise 3x3 + pointwise 1x1, with BatchNorm."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_outputs),
    )


class Tokens(nn.Module):
    """Embedding of integer features (sent as floats, cast here) with a transposed-conv decoder."""

    def __init__(self, input_shape, num_outputs, vocabulary=32, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.up = nn.ConvTranspose1d(dim, 8, 2, stride=2)
        self.out = nn.Linear(8 * 2 * input_shape[0], num_outputs)

    def forward(self, x):
        h = self.embed(x.long().clamp(0, self.embed.num_embeddings - 1)).transpose(1, 2)
        return self.out(self.up(h).flatten(1))


def tokens(input_shape, num_outputs, vocabulary=32, dim=16):
    return Tokens(input_shape, num_outputs, vocabulary, dim)


def head_only(input_shape, num_outputs):
    """An MLP that masks only its output layer, by name."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], 32), nn.ReLU(), nn.Linear(32, num_outputs))
    model.fedprune_masked = ("3.weight",)
    return model


def not_a_module(input_shape, num_outputs):
    return "a string"


def explodes(input_shape, num_outputs):
    raise RuntimeError("the factory's own bug")


def ignores_its_sizes(input_shape, num_outputs):
    """Hard-coded widths: 10 inputs and 3 outputs whatever the federation says."""
    return nn.Sequential(nn.Linear(10, 3))
