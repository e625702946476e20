"""Discrete values as analog bits (Chen et al. 2023, "Analog Bits"; docs/methods.md §7).

A discrete value v ∈ {0, …, L − 1} is written as the n = ⌈log₂ L⌉ bits of a codeword c = code(v),
each bit sent to ±b_scale (b = 1 → +b_scale, b = 0 → −b_scale): real numbers a diffusion model can
generate. Decoding thresholds each analog bit at 0, reads the codeword and inverts the code.

Codes (the `code` of `BitCoder`):

- ``binary``: c = v, plain binary;
- ``gray``:   c = v XOR (v >> 1), the reflected Gray code: adjacent values differ in one bit
              (the same table as the authors' recursive construction);
- ``perm``:   c = π(v), a fixed random permutation of {0, …, 2ⁿ − 1}: numpy's
              ``RandomState(seed).shuffle(arange(2ⁿ))``. With seed 42 and n = 8 this is the table
              the authors ship for 8-bit images ("uint8_s").

Layout [ours, as the authors' channel-last code unfolded to channel-first]: a (C, H, W) image of
values becomes (C·n, H, W) analog bits, channel c's bits in channels c·n … c·n + n − 1, most
significant bit first. When L is not a power of two, a decoded codeword may name a value ≥ L; it
is clamped to L − 1.

Values and data: images in [−1, 1] are quantised to L uniform levels, v = round((x + 1)/2·(L − 1))
(`quantize`), and mapped back by x = 2v/(L − 1) − 1 (`dequantize`). Digits use L = 16 (4 bits a
pixel), 8-bit images L = 256 (8 bits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch

BitCode = Literal["binary", "gray", "perm"]

__all__ = ["BitCode", "n_bits", "quantize", "dequantize", "gray", "code_table", "int_to_bits",
           "bits_to_int", "BitCoder"]


def n_bits(levels: int) -> int:
    """n = ⌈log₂ L⌉ bits for L levels (at least one)."""
    if levels < 2:
        raise ValueError(f"need at least 2 levels, got {levels}")
    return max(1, math.ceil(math.log2(levels)))


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Values in [−1, 1] to integers v = round((x + 1)/2·(L − 1)) ∈ {0, …, L − 1} (int64)."""
    return torch.round((x.double() + 1) / 2 * (levels - 1)).clamp(0, levels - 1).long()


def dequantize(v: torch.Tensor, levels: int) -> torch.Tensor:
    """Integers v ∈ {0, …, L − 1} back to the data range: x = 2v/(L − 1) − 1 (float32)."""
    return (v.double() * 2 / (levels - 1) - 1).float()


def gray(v: torch.Tensor | np.ndarray | int):
    """The reflected Gray code v XOR (v >> 1)."""
    return v ^ (v >> 1)


def code_table(code: BitCode, bits: int, seed: int = 42) -> torch.Tensor:
    """The codeword of every value 0 … 2ⁿ − 1 (int64, a permutation of 0 … 2ⁿ − 1)."""
    v = np.arange(2**bits, dtype=np.int64)
    if code == "binary":
        table = v
    elif code == "gray":
        table = gray(v)
    elif code == "perm":
        table = v.copy()
        np.random.RandomState(seed).shuffle(table)
    else:
        raise ValueError(f"unknown bit code {code!r}")
    return torch.from_numpy(np.ascontiguousarray(table))


def int_to_bits(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (...) to their bits (..., n) in {0, 1}, most significant first."""
    shifts = torch.arange(bits - 1, -1, -1, device=c.device)
    return (c.long().unsqueeze(-1) >> shifts) & 1


def bits_to_int(b: torch.Tensor) -> torch.Tensor:
    """Bits (..., n) in {0, 1}, most significant first, to integers (...)."""
    bits = b.shape[-1]
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=b.device)
    return (b.long() * weights).sum(-1)


@dataclass(frozen=True)
class BitCoder:
    """Encode (N, C, H, W) integer values as (N, C·n, H, W) analog bits in {±b_scale} and back."""

    levels: int
    code: BitCode = "binary"
    seed: int = 42          # the permutation's seed (code "perm")
    b_scale: float = 1.0

    @property
    def bits(self) -> int:
        return n_bits(self.levels)

    @cached_property
    def table(self) -> torch.Tensor:
        return code_table(self.code, self.bits, self.seed)

    @cached_property
    def inverse(self) -> torch.Tensor:
        return torch.argsort(self.table)

    def shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The analog-bit shape (C·n, H, W) of values of shape (C, H, W)."""
        return (data_shape[0] * self.bits, *data_shape[1:])

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) integers in {0, …, L − 1} -> (N, C·n, H, W) analog bits ±b_scale (float32)."""
        if v.is_floating_point():
            raise TypeError("encode takes integer values (quantise images first: bits.quantize)")
        if int(v.min()) < 0 or int(v.max()) >= self.levels:
            raise ValueError(f"values must lie in 0..{self.levels - 1}")
        c = self.table.to(v.device)[v.long()]
        b = int_to_bits(c, self.bits)                      # (N, C, H, W, n)
        n, C, *hw = v.shape
        b = b.movedim(-1, 2).reshape(n, C * self.bits, *hw)  # channel c's bits next to each other
        return (b.float() * 2 - 1) * self.b_scale

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """(N, C·n, H, W) analog bits -> (N, C, H, W) integers: threshold at 0, invert the code,
        clamp to L − 1 (int64)."""
        n, Cb, *hw = a.shape
        if Cb % self.bits:
            raise ValueError(f"{Cb} channels are not a multiple of {self.bits} bits")
        b = (a > 0).reshape(n, Cb // self.bits, self.bits, *hw).movedim(2, -1)
        v = self.inverse.to(a.device)[bits_to_int(b)]
        return v.clamp(max=self.levels - 1)
