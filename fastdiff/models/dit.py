"""DiT: a class-conditional diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers") on fastdiff's ops.

The image (B, C, H, W) is cut into p x p patches by a stride-p convolution, giving N = (H/p)(W/p)
tokens of width D, plus a 2-D sine-cosine position embedding (fixed, or learned from that start).
The conditioning c (B, D) is the timestep's embedding (sinusoidal frequencies through a two-layer
MLP) plus the class's (a table with one extra row, the null class, for classifier-free guidance).
Each block is adaLN-Zero (sec. 3.2): a SiLU + linear map of c gives six (B, D) vectors, and

    x = x + gate_msa * attn(modulate(norm(x), shift_msa, scale_msa))
    x = x + gate_mlp * mlp(modulate(norm(x), shift_mlp, scale_mlp))

with ``modulate(norm(x), shift, scale)`` one :func:`fastdiff.ops.layer_norm_modulate` (no affine,
eps 1e-6), attention by :func:`fastdiff.ops.attention` on q, k, v viewed in place from one qkv
projection, and a GELU (tanh) MLP. The final layer modulates once more (shift and scale from c) and
maps each token to p * p * C_out values, which are put back as an image (C_out = 2C with
``learn_sigma``: eps and the interpolation of the variance, as ``fastdiff.sample(...,
variance="learned_range")`` reads it). The modulation maps and the final linear start at zero, so a
new DiT is the identity in every block and outputs exactly zero.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from ..backends import AUTO, BACKENDS
from ..nn.adaln import AdaLayerNorm
from ..ops import attention

__all__ = ["DiT", "sincos_position_embedding_2d", "timestep_embedding"]

_NORM_EPS = 1e-6  # DiT's LayerNorm(elementwise_affine=False, eps=1e-6)
_POS_EMBEDS = ("sincos", "learned")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 sinusoids [cos(t w_i), sin(t w_i)] with frequencies
    w_i = max_period^(-i / half), i < half = dim // 2 (Vaswani et al. 2017; zero-padded for odd dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.reshape(-1, 1).to(torch.float64) * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_position_embedding_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed 2-D embedding of a row-major token grid: half the channels encode
    the column, half the row, each as 1-D sines and cosines. dim must be a multiple of 4."""
    if dim % 4 != 0:
        raise ValueError(f"DiT: the sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.to(torch.float32)


class _Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D): one qkv projection, q/k/v as views of it."""

    def __init__(self, dim: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # (B, N, 3, H, hd) -> three (B, H, N, hd) strided views; the attention ops read them in place.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, backend=self.backend)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block: modulated norms, gated residual attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str) -> None:
        super().__init__()
        self.attn = _Attention(dim, num_heads, backend)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1 = AdaLayerNorm(dim, eps=_NORM_EPS, backend=backend)
        self.norm2 = AdaLayerNorm(dim, eps=_NORM_EPS, backend=backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Six (B, D) chunks of one (B, 6D) projection: strided views, read in place by the norm.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1(x, scale=scale_msa, shift=shift_msa)
        x = x + gate_msa.unsqueeze(1) * self.attn(h)
        h = self.norm2(x, scale=scale_mlp, shift=shift_mlp)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class _FinalLayer(nn.Module):
    def __init__(self, dim: int, out_features: int, backend: str) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.norm_final = AdaLayerNorm(dim, eps=_NORM_EPS, backend=backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x, scale=scale, shift=shift))


class DiT(nn.Module):
    """``model(x, t, y=None)``: a DiT denoiser for x (B, in_channels, input_size, input_size).

    Args:
        input_size: the (square) image or latent side, a multiple of ``patch_size``.
        patch_size: p; N = (input_size / p)**2 tokens.
        in_channels: C of x.
        hidden_size: token width D (a multiple of ``num_heads``, and of 4 for the position embedding).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: the MLP's hidden width over D.
        num_classes: class labels 0 .. num_classes - 1; label ``num_classes`` is the null class
            (unconditional, for classifier-free guidance), also used when ``y`` is None.
            0 makes an unconditional model (``y`` must be None).
        learn_sigma: output 2C channels (eps, then the variance interpolation) instead of C.
        pos_embed: "sincos" (fixed, as in DiT) or "learned" (a parameter that starts as the sin-cos table).
        class_dropout_prob: in training mode (``model.train()``), the probability that a sample's label
            is replaced by the null class (DiT's label dropout, 0.1 there), so one model learns the
            conditional and unconditional predictions classifier-free guidance combines. Drawn from
            torch's global RNG; eval mode never drops.
        backend: the backend of every fastdiff op in the model (layer_norm_modulate, attention):
            "auto" or one of fastdiff.backends.BACKENDS ("reference" runs plain PyTorch).

    ``forward(x, t, y=None)``: t (B,) timesteps; y (B,) int64 labels. Returns (B, C_out, H, W).
    Sizes of DiT-XL/2: ``DiT(32, 2, 4, 1152, 28, 16, num_classes=1000, learn_sigma=True)``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        pos_embed: str = "sincos",
        class_dropout_prob: float = 0.0,
        backend: str = AUTO,
    ) -> None:
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            positive_int(name, value, "DiT")
        if input_size % patch_size != 0:
            raise ValueError(f"DiT: input_size ({input_size}) must be divisible by patch_size ({patch_size})")
        if hidden_size % num_heads != 0:
            raise ValueError(f"DiT: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 4 != 0:
            raise ValueError(
                f"DiT: hidden_size ({hidden_size}) must be divisible by 4 (2-D sin-cos position "
                "embedding: sines and cosines of rows and columns)"
            )
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
            raise ValueError(f"DiT: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if not math.isfinite(mlp_ratio):
            raise ValueError(f"DiT: mlp_ratio must be a finite positive number, got {mlp_ratio!r}")
        if int(hidden_size * mlp_ratio) < 1:
            raise ValueError(
                f"DiT: mlp_ratio ({mlp_ratio}) leaves the MLP no hidden units at hidden_size {hidden_size}"
            )
        if not isinstance(learn_sigma, bool):
            raise ValueError(f"DiT: learn_sigma must be True or False, got {learn_sigma!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"DiT: num_classes must be an int >= 0 (0: unconditional), got {num_classes!r}")
        if (
            isinstance(class_dropout_prob, bool)
            or not isinstance(class_dropout_prob, numbers.Real)
            or not 0.0 <= class_dropout_prob <= 1.0
        ):
            raise ValueError(f"DiT: class_dropout_prob must be a number in [0, 1], got {class_dropout_prob!r}")
        if class_dropout_prob > 0 and num_classes == 0:
            raise ValueError("DiT: class_dropout_prob needs class labels; this model is unconditional (num_classes=0)")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"DiT: pos_embed must be one of {_POS_EMBEDS}, got {pos_embed!r}")
        if backend not in (AUTO, *BACKENDS):
            raise ValueError(f"DiT: backend must be one of {(AUTO, *BACKENDS)}, got {backend!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.class_dropout_prob = float(class_dropout_prob)
        self.pos_embed_kind = pos_embed
        self.frequency_embedding_size = 256
        self._backend = backend

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = input_size // patch_size
        table = sincos_position_embedding_2d(hidden_size, grid)[None]  # (1, N, D)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table)
        self.t_embedder = nn.Sequential(
            nn.Linear(self.frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, backend) for _ in range(depth)])
        self.final_layer = _FinalLayer(hidden_size, patch_size * patch_size * self.out_channels, backend)
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        """Switch every op in the model to another backend (same weights)."""
        if value not in (AUTO, *BACKENDS):
            raise ValueError(f"DiT: backend must be one of {(AUTO, *BACKENDS)}, got {value!r}")
        self._backend = value
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = value

    @property
    def null_class(self) -> int:
        """The label of the unconditional (null) class, for ``uncond={"y": ...}``."""
        return self.num_classes

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier-uniform linear and patch weights, zero biases, N(0, 0.02)
        class and timestep embeddings, and adaLN-Zero: every modulation map and the final linear at
        zero, so each block starts as the identity and the output as zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.pos_embed_kind == "learned":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_position_embedding_2d(self.hidden_size, self.input_size // self.patch_size))

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, hidden_size={self.hidden_size}, depth={self.depth}, "
            f"num_heads={self.num_heads}, mlp_ratio={self.mlp_ratio}, num_classes={self.num_classes}, "
            f"pos_embed={self.pos_embed_kind!r}, class_dropout_prob={self.class_dropout_prob}, "
            f"backend={self.backend!r}"
        )

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DiT: x must have shape (B, {', '.join(map(str, expected))}), got {got}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"DiT: t must be a ({x.shape[0]},) tensor of timesteps, got {got}")
        if y is not None:
            if self.y_embedder is None:
                raise ValueError("DiT: this model is unconditional (num_classes=0); y must be None")
            if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
                got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"DiT: y must be a ({x.shape[0]},) integer tensor of class labels, got {got}")

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * C_out) -> (B, C_out, H, W)."""
        B = tokens.shape[0]
        p, g, c = self.patch_size, self.input_size // self.patch_size, self.out_channels
        return tokens.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, t, y)
        dtype = self.x_embedder.weight.dtype
        tokens = self.x_embedder(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = tokens + self.pos_embed.to(dtype)
        c = self.t_embedder(timestep_embedding(t, self.frequency_embedding_size).to(dtype))
        if self.y_embedder is not None:
            labels = y if y is not None else torch.full_like(t, self.null_class, dtype=torch.long)
            if self.training and self.class_dropout_prob > 0:  # train the null class for guidance
                dropped = torch.rand(labels.shape, device=labels.device) < self.class_dropout_prob
                labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
            c = c + self.y_embedder(labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))
