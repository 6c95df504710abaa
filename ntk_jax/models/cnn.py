"""A small LeNet-like convolutional classifier for 8×8 grey-scale images (the scikit-learn
digits, :mod:`ntk_jax.data.digits`), in Flax NNX.

    model = LeNet(LeNetConfig(), rngs=nnx.Rngs(0))
    logits = model(images)            # (n, 8, 8, 1) float32 -> (n, num_classes) float32

Layers (``c1, c2 = channels``, ``h = hidden``)::

    conv 3×3 (1 → c1, SAME) · relu · max-pool 2×2   8×8 → 4×4
    conv 3×3 (c1 → c2, SAME) · relu · max-pool 2×2  4×4 → 2×2
    flatten (4·c2) · dense → h · relu · dense → num_classes

Every parameter is an ``nnx.Param`` (train all of them with ``wrt=nnx.Param``; the lpNTK of
docs/theory.md §6.3 is taken over all of them). No dropout, no batch statistics, so the model
is a pure function of its parameters and inputs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ntk_jax.utils import DictConfig

__all__ = ["LeNetConfig", "LeNet", "num_params"]


@dataclasses.dataclass(frozen=True)
class LeNetConfig(DictConfig):
    """``channels``: output channels of the two convolutions; ``hidden``: width of the dense
    layer; ``image_shape``: ``(H, W, C)`` of the inputs (H and W divisible by 4)."""

    channels: tuple = (16, 32)
    hidden: int = 64
    num_classes: int = 10
    image_shape: tuple = (8, 8, 1)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "image_shape", tuple(int(c) for c in self.image_shape))
        if len(self.channels) != 2 or min(self.channels) <= 0:
            raise ValueError(f"channels must be two positive ints, got {self.channels}")
        if self.hidden <= 0 or self.num_classes < 2:
            raise ValueError(f"hidden must be > 0 and num_classes >= 2, got {self.hidden}, {self.num_classes}")
        h, w, _ = self.image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image height and width must be divisible by 4 (two 2x2 pools), got {self.image_shape}")


class LeNet(nnx.Module):
    """``__call__(x (n, H, W, C)) -> (n, num_classes)`` float32 logits."""

    def __init__(self, config: LeNetConfig = LeNetConfig(), *, rngs: nnx.Rngs):
        self.config = config
        c1, c2 = config.channels
        h, w, c = config.image_shape
        self.conv1 = nnx.Conv(c, c1, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.dense = nnx.Linear((h // 4) * (w // 4) * c2, config.hidden, rngs=rngs)
        self.head = nnx.Linear(config.hidden, config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(f"expected images (n, {', '.join(map(str, self.config.image_shape))}), got {x.shape}")
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(x).astype(jnp.float32)


def num_params(model: nnx.Module) -> int:
    """Number of scalars in the model's ``nnx.Param`` leaves."""
    return int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
