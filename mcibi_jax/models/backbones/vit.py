"""Vision Transformer backbone (ViT-Large/16 in MCIBI's released ADE20K / COCO-Stuff configs).

Token maps are kept as (N, L, C) sequences inside the encoder and returned as NHWC
feature maps. Submodule names mirror the PyTorch ``state_dict`` (``patch_embed.projection``,
``layers.<i>.attn.attn.in_proj_weight``, ``layers.<i>.ffn.layers.0.0``, ...), see
``mcibi_jax.porting.mapping``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.models.cudnn_attention import fused_attention, use_fused_attention
from mcibi_jax.models.layers import hold_on_cpu, softmax
from mcibi_jax.models.resize import resize

Array = jax.Array
Dtype = Any

# Architecture a named structure type must have (the reference asserts these at build time).
_STRUCTURE_CHECKS: dict[str, dict[str, Any]] = {
    "jx_vit_large_p16_384": {
        "patch_size": 16,
        "embed_dims": 1024,
        "num_layers": 24,
        "num_heads": 16,
        "mlp_ratio": 4,
        "qkv_bias": True,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "with_cls_token": True,
        "output_cls_token": False,
        "patch_norm": False,
        "final_norm": False,
        "num_fcs": 2,
    },
}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def _precision(dtype: Dtype | None) -> jax.lax.Precision | None:
    return jax.lax.Precision.HIGHEST if dtype in (None, jnp.float32) else None


def _dense(features: int, use_bias: bool, dtype: Dtype | None, name: str) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, precision=_precision(dtype), name=name
    )


def _layer_norm(norm_cfg: Mapping[str, Any], dtype: Dtype | None, name: str) -> nn.LayerNorm:
    """``nn.LayerNorm(C, eps)`` of PyTorch: biased variance computed around the mean."""
    cfg = dict(norm_cfg)
    if cfg.pop("type") != "LayerNorm":
        raise NotImplementedError(f"only LayerNorm is supported, got {norm_cfg!r}")
    eps = cfg.pop("eps", 1e-5)
    if cfg.pop("elementwise_affine", True) is not True or cfg:
        raise NotImplementedError(f"unsupported LayerNorm options {cfg!r}")
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def _activation(act_cfg: Mapping[str, Any] | None):
    if act_cfg is None:
        return lambda x: x
    cfg = dict(act_cfg)
    kind = cfg.pop("type")
    cfg.pop("inplace", None)
    if kind == "GELU":  # torch's nn.GELU: exact (erf) unless approximate='tanh'
        return lambda x: jax.nn.gelu(x, approximate=cfg.get("approximate", "none") == "tanh")
    if kind == "ReLU":
        return nn.relu
    raise NotImplementedError(f"unsupported activation {act_cfg!r}")


def drop_path(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
    """Stochastic depth: zeroes whole samples with probability ``rate``, rescales the rest."""
    if rate == 0.0 or not train:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jnp.floor(keep + jax.random.uniform(module.make_rng("dropout"), shape, x.dtype))
    return x / keep * mask


class PatchEmbed(nn.Module):
    """Adaptive padding, strided conv ``projection`` and optional ``norm``.

    (N, H, W, Cin) -> tokens (N, h * w, C) in row-major order, and (h, w).
    """

    embed_dims: int
    patch_size: int
    padding: str | int = "corner"
    use_bias: bool = True
    norm_cfg: Mapping[str, Any] | None = None
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, tuple[int, int]]:
        k = self.patch_size
        if isinstance(self.padding, str):
            pad_h = -x.shape[1] % k  # kernel == stride: pad up to the next multiple
            pad_w = -x.shape[2] % k
            if self.padding == "corner":
                pads = ((0, pad_h), (0, pad_w))
            elif self.padding == "same":
                pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
            else:
                raise ValueError(f"unknown adaptive padding {self.padding!r}")
        else:
            pads = ((self.padding, self.padding), (self.padding, self.padding))
        x = nn.Conv(
            self.embed_dims,
            (k, k),
            strides=(k, k),
            padding=pads,
            use_bias=self.use_bias,
            dtype=self.dtype,
            precision=_precision(self.dtype),
            name="projection",
        )(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.norm_cfg is not None:
            x = _layer_norm(self.norm_cfg, self.dtype, "norm")(x)
        return x, (h, w)


class SelfAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` used as self-attention on (N, L, E) tokens.

    Its packed ``in_proj`` holds q, k, v in this order; ``bias`` switches the biases of
    both ``in_proj`` and ``out_proj`` (as in PyTorch).
    """

    embed_dims: int
    num_heads: int
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        n, length, dims = x.shape
        head_dims = dims // self.num_heads
        qkv = _dense(3 * dims, self.use_bias, self.dtype, "in_proj")(x)
        qkv = qkv.reshape(n, length, 3, self.num_heads, head_dims)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = q * math.sqrt(1.0 / head_dims)  # PyTorch scales the queries, not the logits
        precision = _precision(self.dtype)
        without_dropout = not train or self.dropout == 0.0
        if without_dropout and use_fused_attention(q, k, v):
            out = fused_attention(q, k, v, 1.0)
        elif without_dropout and use_per_head_attention(n, self.num_heads, length, q.dtype):
            out = per_head_attention(q, k, v, precision)
        else:
            logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=precision)
            weights = softmax(logits).astype(v.dtype)
            weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
            out = jnp.einsum("nhqk,nkhd->nqhd", weights, v, precision=precision)
        return _dense(dims, self.use_bias, self.dtype, "out_proj")(out.reshape(n, length, dims))


# Above this many bytes of attention logits (N * heads * L * L), CPU attention runs head by head.
PER_HEAD_ATTENTION_BYTES = 32 * 2**20


def use_per_head_attention(batch: int, heads: int, length: int, dtype: Dtype) -> bool:
    """Whether :class:`SelfAttention` runs :func:`per_head_attention` (static): on CPU, when the
    logits of all heads at once would not stay in cache. Measured (2-core Intel Xeon), ViT-L at
    512x512 (1025 tokens, 16 heads): 98 -> 30 ms a layer forward, 214 -> 147 ms forward +
    backward; at 256x256 (257 tokens, batch 2) all heads at once is faster."""
    logits_bytes = batch * heads * length * length * jnp.dtype(dtype).itemsize
    return jax.default_backend() == "cpu" and logits_bytes > PER_HEAD_ATTENTION_BYTES


def per_head_attention(q: Array, k: Array, v: Array, precision: Any = None) -> Array:
    """softmax(q k^T) v one (image, head) at a time (``lax.map``), so that each (L, L) logit
    matrix stays in cache through its softmax and product: q, k, v (N, L, H, D) -> (N, L, H, D)."""
    n, length, heads, head_dims = q.shape

    def by_head(x: Array) -> Array:
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(n * heads, length, head_dims)

    def one_head(qkv: tuple[Array, Array, Array]) -> Array:
        q1, k1, v1 = qkv
        weights = softmax(jnp.dot(q1, k1.T, precision=precision)).astype(v1.dtype)
        return jnp.dot(weights, v1, precision=precision)

    out = jax.lax.map(one_head, (by_head(q), by_head(k), by_head(v)))
    return jnp.transpose(out.reshape(n, heads, length, head_dims), (0, 2, 1, 3))


class AttentionBlock(nn.Module):
    """Residual self-attention: ``x + dropout(attn(query))``, the identity being ``x``."""

    embed_dims: int
    num_heads: int
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, query: Array, identity: Array, train: bool) -> Array:
        out = SelfAttention(
            self.embed_dims, self.num_heads, self.attn_drop, self.use_bias, self.dtype, name="attn"
        )(query, train)
        out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
        # Quirk of the reference: no stochastic depth on the attention branch (only in the FFN).
        return identity + out


class _FCBlock(nn.Module):
    """``Sequential(Linear "0", activation, Dropout)``."""

    features: int
    act_cfg: Mapping[str, Any] | None
    rate: float
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = _dense(self.features, True, self.dtype, "0")(x)
        x = _activation(self.act_cfg)(x)
        return nn.Dropout(self.rate, deterministic=not train)(x)


class _FFNLayers(nn.Module):
    """The FFN's ``layers`` Sequential: ``num_fcs - 1`` blocks, then the output Linear."""

    embed_dims: int
    feedforward_channels: int
    num_fcs: int
    act_cfg: Mapping[str, Any] | None
    rate: float
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(self.num_fcs - 1):
            x = _FCBlock(
                self.feedforward_channels, self.act_cfg, self.rate, self.dtype, name=str(i)
            )(x, train)
        x = _dense(self.embed_dims, True, self.dtype, str(self.num_fcs - 1))(x)
        return nn.Dropout(self.rate, deterministic=not train)(x)


class FFN(nn.Module):
    """Residual MLP ``identity + drop_path(layers(x))``."""

    embed_dims: int
    feedforward_channels: int
    num_fcs: int = 2
    act_cfg: Mapping[str, Any] | None = dataclasses.field(default_factory=lambda: {"type": "GELU"})
    ffn_drop: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, identity: Array, train: bool) -> Array:
        if self.num_fcs < 2:
            raise ValueError(f"num_fcs must be at least 2, got {self.num_fcs}")
        out = _FFNLayers(
            self.embed_dims,
            self.feedforward_channels,
            self.num_fcs,
            self.act_cfg,
            self.ffn_drop,
            self.dtype,
            name="layers",
        )(x, train)
        return identity + drop_path(self, out, self.drop_path_rate, train)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))`` on (N, L, E) tokens."""

    embed_dims: int
    num_heads: int
    feedforward_channels: int
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    num_fcs: int = 2
    qkv_bias: bool = True
    act_cfg: Mapping[str, Any] | None = dataclasses.field(default_factory=lambda: {"type": "GELU"})
    norm_cfg: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"type": "LayerNorm", "eps": 1e-6}
    )
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        # the residual stream is held after each half (its gradient too): ViT-L's 2x256x256 train
        # step on CPU spent 8 of 19.5 s in backward fusions recomputing later layers' norms
        x = AttentionBlock(
            self.embed_dims,
            self.num_heads,
            self.attn_drop_rate,
            self.drop_rate,
            self.qkv_bias,
            self.dtype,
            name="attn",
        )(_layer_norm(self.norm_cfg, self.dtype, "ln1")(x), x, train)
        x = hold_on_cpu(x)
        x = FFN(
            self.embed_dims,
            self.feedforward_channels,
            self.num_fcs,
            self.act_cfg,
            self.drop_rate,
            self.drop_path_rate,
            self.dtype,
            name="ffn",
        )(_layer_norm(self.norm_cfg, self.dtype, "ln2")(x), x, train)
        return hold_on_cpu(x)


class _EncoderLayers(nn.Module):
    """The ``layers`` ModuleList; returns the tokens after every layer."""

    layer_kwargs: Mapping[str, Any]
    drop_path_rates: Sequence[float]
    use_checkpoint: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> list[Array]:
        layer_cls = (
            nn.remat(TransformerEncoderLayer, static_argnums=(2,))
            if self.use_checkpoint
            else TransformerEncoderLayer
        )
        outputs = []
        for i, rate in enumerate(self.drop_path_rates):
            x = layer_cls(drop_path_rate=rate, **self.layer_kwargs, name=str(i))(x, train)
            outputs.append(x)
        return outputs


def resize_pos_embed(
    pos_embed: Array, out_shape: tuple[int, int], pos_shape: tuple[int, int], mode: str
) -> Array:
    """Resizes the grid part of a (1, 1 + h*w, C) position embedding; the cls entry is kept.

    (1, L, C) -> (1, 1 + out_h * out_w, C).
    """
    pos_h, pos_w = pos_shape
    cls_entry = pos_embed[:, :1]
    grid = pos_embed[:, -pos_h * pos_w :].reshape(1, pos_h, pos_w, pos_embed.shape[-1])
    grid = resize(grid, out_shape, mode=mode, align_corners=False)
    grid = grid.reshape(1, out_shape[0] * out_shape[1], pos_embed.shape[-1])
    return jnp.concatenate([cls_entry, grid], axis=1)


class VisionTransformer(nn.Module):
    """ViT backbone: (N, H, W, in_channels) -> one NHWC map (N, ceil(H/p), ceil(W/p), C) per
    entry of ``out_indices`` (plus one before the first layer if ``out_origin``); with
    ``output_cls_token`` each entry is a pair ``(map, cls (N, C))``.

    In training with non-zero drop rates, ``apply`` needs ``rngs={"dropout": key}``.
    ``pretrained`` / ``pretrained_model_path`` are accepted for config compatibility only:
    weights come from the checkpoint porter.
    """

    structure_type: str = ""  # only selects the architecture checks of _STRUCTURE_CHECKS
    img_size: int | Sequence[int] = 224
    patch_size: int = 16
    patch_pad: str | int = "corner"
    in_channels: int = 3
    embed_dims: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4
    out_origin: bool = False
    out_indices: int | Sequence[int] = (9, 14, 19, 23)
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    with_cls_token: bool = True
    output_cls_token: bool = False
    norm_cfg: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"type": "LayerNorm", "eps": 1e-6}
    )
    act_cfg: Mapping[str, Any] | None = dataclasses.field(default_factory=lambda: {"type": "GELU"})
    patch_norm: bool = False
    patch_bias: bool = True
    pre_norm: bool = False
    final_norm: bool = False
    interpolate_mode: str = "bilinear"
    num_fcs: int = 2
    use_checkpoint: bool = False
    pretrained: bool = True
    pretrained_model_path: str = ""
    dtype: Dtype | None = None

    def _check_options(self) -> None:
        if self.output_cls_token and not self.with_cls_token:
            raise ValueError("output_cls_token requires with_cls_token")
        for key, value in _STRUCTURE_CHECKS.get(self.structure_type, {}).items():
            if getattr(self, key) != value:
                raise ValueError(
                    f"{self.structure_type} needs {key}={value!r}, got {getattr(self, key)!r}"
                )

    def _selected_layers(self) -> tuple[int, ...]:
        if isinstance(self.out_indices, int):
            return (self.num_layers - 1 if self.out_indices == -1 else self.out_indices,)
        return tuple(self.out_indices)

    def _feature(self, x: Array, hw_shape: tuple[int, int]) -> Array | tuple[Array, Array]:
        tokens = x[:, 1:] if self.with_cls_token else x
        out = tokens.reshape(x.shape[0], hw_shape[0], hw_shape[1], x.shape[-1])
        return (out, x[:, 0]) if self.output_cls_token else out

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Any, ...]:
        self._check_options()
        dtype = self.dtype or jnp.float32
        img_h, img_w = _pair(self.img_size)
        pos_h, pos_w = img_h // self.patch_size, img_w // self.patch_size

        x, hw_shape = PatchEmbed(
            self.embed_dims,
            self.patch_size,
            self.patch_pad,
            self.patch_bias,
            self.norm_cfg if self.patch_norm else None,
            self.dtype,
            name="patch_embed",
        )(x.astype(dtype))
        # The reference initialises both to zeros (pretrained weights overwrite them).
        cls_token = self.param(
            "cls_token", nn.initializers.zeros, (1, 1, self.embed_dims), jnp.float32
        )
        pos_embed = self.param(
            "pos_embed", nn.initializers.zeros, (1, pos_h * pos_w + 1, self.embed_dims), jnp.float32
        )

        n = x.shape[0]
        x = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(dtype), (n, 1, self.embed_dims)), x], axis=1
        )
        # Quirk of the reference: resized only when the token counts differ, so an input whose
        # patch grid is a different shape with the same area reuses the stored grid as is.
        if x.shape[1] != pos_embed.shape[1]:
            pos_embed = resize_pos_embed(pos_embed, hw_shape, (pos_h, pos_w), self.interpolate_mode)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x + pos_embed.astype(dtype))
        if not self.with_cls_token:
            x = x[:, 1:]
        if self.pre_norm:
            x = _layer_norm(self.norm_cfg, self.dtype, "ln_pre")(x)

        selected = self._selected_layers()
        outputs = [self._feature(x, hw_shape)] if self.out_origin else []
        rates = [
            float(r)
            for r in np.linspace(0.0, self.drop_path_rate, self.num_layers, dtype=np.float32)
        ]
        layer_kwargs = dict(
            embed_dims=self.embed_dims,
            num_heads=self.num_heads,
            feedforward_channels=int(self.mlp_ratio * self.embed_dims),
            drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate,
            num_fcs=self.num_fcs,
            qkv_bias=self.qkv_bias,
            act_cfg=self.act_cfg,
            norm_cfg=self.norm_cfg,
            dtype=self.dtype,
        )
        tokens = _EncoderLayers(layer_kwargs, rates, self.use_checkpoint, name="layers")(x, train)
        for i, x in enumerate(tokens):
            if i == self.num_layers - 1 and self.final_norm:
                x = _layer_norm(self.norm_cfg, self.dtype, "ln1")(x)
            if i in selected:
                outputs.append(self._feature(x, hw_shape))
        return tuple(outputs)
