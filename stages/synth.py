"""Smooth random fields and shapes that the synthetic SAR scenes are drawn with (numpy only)."""

from __future__ import annotations

import numpy as np


def box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Separable mean filter of width 2*radius+1 with reflected edges (cumulative sums)."""
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(a, pad, mode="reflect"), axis=axis)
        n = a.shape[axis]
        hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        a = (hi - lo) / (2 * radius + 1)
    return a


def smooth_noise(rng: np.random.Generator, size: int, radius: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (three box blurs approximate a Gaussian)."""
    a = rng.standard_normal((size, size))
    radius = max(1, min(radius, size // 2 - 1))
    for _ in range(3):
        a = box_blur(a, radius)
    return (a - a.mean()) / (a.std() + 1e-12)


def river_band(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, shift: float, amp: tuple[float, float],
               period: tuple[float, float], half_width: tuple[float, float]) -> np.ndarray:
    """A meandering band at a random angle (bool H x W); ranges are fractions of the scene size.

    Its centre line passes within `shift` of the scene centre; a sine of amplitude
    `amp` and wavelength `period` bends it; `half_width` is half its width.
    """
    size = xx.shape[0]
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    centre = (size / 2) * (np.cos(theta) - np.sin(theta)) + rng.uniform(-shift, shift) * size
    a, wavelength, phase = rng.uniform(*amp) * size, rng.uniform(*period) * size, rng.uniform(0, 2 * np.pi)
    half = rng.uniform(*half_width) * size
    return np.abs(v - centre - a * np.sin(2 * np.pi * u / wavelength + phase)) < half
