"""Hadamard rotations for outlier-spreading before quantization (QuaRot / QuIP#-style).

Why: activations of diffusion U-Nets have a few channels with huge magnitudes, which force a
large quantization step on every channel. Multiplying the channel vector by an orthogonal matrix
Q spreads each outlier over all channels (a normalised Hadamard row has entries ±1/√n), and the
layer's weights absorb Qᵀ so the float network computes exactly the same function. Hadamard
matrices are preferred over arbitrary rotations because their entries are ±1: cheap, exact, and
maximally "flat".

Constructions (all built, none pasted):

* Sylvester: H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]], orders 2^k.
* Paley I: order q + 1 for a prime power q ≡ 3 (mod 4).
* Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4).
* Kronecker products H_{2^k} ⊗ P of the above, e.g. 320 = 16·20, 960 = 16·60, 224 = 8·28.

Paley needs the quadratic character χ of GF(q); for q = p^k with k > 1 the field is built as
polynomials over GF(p) modulo an irreducible polynomial of degree k (found by trial division), so
e.g. order 28 (q = 27) and order 52 (q = 25) are covered. No Hadamard matrix exists for orders
other than 1, 2 and multiples of 4; multiples of 4 not of the form 2^k·m with m one of these
orders are not constructed here (e.g. 92, which needs Williamson's construction).

Convention used throughout: activations are row vectors and rotate as x' = x Q; weights fold as
W' = W Q on their input-channel axis (see :func:`rotate_channels`).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product

import numpy as np
import torch

from quantface.errors import ConfigError


# ----------------------------------------------------------------------------- number theory
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, or None when q is not a prime power (q < 2 included)."""
    if q < 2:
        return None
    p = next((d for d in range(2, int(q ** 0.5) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a by the monic polynomial f over GF(p); coefficients lowest degree first."""
    a = list(a)
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top]
        if c:
            for i, fi in enumerate(f):
                a[top - len(f) + 1 + i] = (a[top - len(f) + 1 + i] - c * fi) % p
    return a[: len(f) - 1]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (lowest degree first).

    A polynomial is reducible iff it has a monic factor of degree ≤ k/2, so trial division by
    those factors decides it; the fields used here are tiny, so brute force is fine.
    """
    factors = [list(c) + [1] for d in range(1, k // 2 + 1) for c in product(range(p), repeat=d)]
    for low in product(range(p), repeat=k):
        f = list(low) + [1]
        if low[0] and not any(not any(_poly_mod(f, g, p)) for g in factors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible


def _quadratic_character(p: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits of every element of GF(p^k) and χ of every element.

    Element e ∈ [0, q) stands for the polynomial Σ digit_i(e)·x^i, digits base p. Returns
    (digits (q, k), chi (q,)) with χ(0) = 0, χ = +1 on nonzero squares and −1 otherwise.
    """
    q = p ** k
    powers = p ** np.arange(k)
    digits = (np.arange(q)[:, None] // powers) % p
    f = _irreducible(p, k) if k > 1 else [0, 1]
    # Square every element: polynomial product, then reduce modulo f from the top degree down.
    sq = np.zeros((q, 2 * k - 1), dtype=np.int64)
    for i in range(k):
        sq[:, i: i + k] += digits[:, i: i + 1] * digits
    for top in range(2 * k - 2, k - 1, -1):
        c = sq[:, top].copy()
        for i, fi in enumerate(f):
            sq[:, top - k + i] -= c * fi
    squares = (sq[:, :k] % p) @ powers
    chi = -np.ones(q, dtype=np.int64)
    chi[squares] = 1
    chi[0] = 0
    return digits, chi


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[a, b] = χ(a − b) over GF(q), q × q (a, b indexed as field elements)."""
    p, k = _prime_power(q)
    digits, chi = _quadratic_character(p, k)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ (p ** np.arange(k))
    return chi[diff]


# ----------------------------------------------------------------------------- constructions
def _paley(q: int, kind: int) -> np.ndarray:
    """Paley I (kind 1, order q + 1, q ≡ 3 mod 4) or Paley II (kind 2, order 2(q + 1), q ≡ 1 mod 4)."""
    core = np.zeros((q + 1, q + 1), dtype=np.int64)
    core[1:, 1:] = _jacobsthal(q)
    core[0, 1:] = 1
    if kind == 1:
        core[1:, 0] = -1  # skew S with S Sᵀ = qI, so (I + S)(I + S)ᵀ = (q + 1)I
        return core + np.eye(q + 1, dtype=np.int64)
    core[1:, 0] = 1  # symmetric C with C² = qI and zero diagonal
    return np.kron(core, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


def _plan(n: int) -> tuple[int, int, int] | None:
    """(k, kind, q) with n = 2^k · m, m = 1 (kind 0) or a Paley order; None if not constructible.

    Candidates are tried with the smallest m first: the Sylvester factor is a cheap Kronecker
    product while the Paley factor costs O(m²) finite-field work.
    """
    if n < 1:
        return None
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):
        m = n >> k
        if m == 1:
            return k, 0, 0
        pk = _prime_power(m - 1)
        if pk and (m - 1) % 4 == 3:
            return k, 1, m - 1
        pk = _prime_power(m // 2 - 1) if m % 2 == 0 else None
        if pk and (m // 2 - 1) % 4 == 1:
            return k, 2, m // 2 - 1
    return None


@lru_cache(maxsize=64)
def _hadamard_int8(n: int) -> np.ndarray:
    """Cached ±1 Hadamard matrix of order n as a read-only int8 array (compact cache entry)."""
    plan = _plan(n)
    if plan is None:
        raise ConfigError(f"No Hadamard matrix of order {n} can be constructed here "
                          f"(supported: 2^k times 1 or a Paley order q+1 / 2(q+1), q a prime power).")
    k, kind, q = plan
    h = np.ones((1, 1), dtype=np.int64) if kind == 0 else _paley(q, kind)
    for _ in range(k):
        h = np.block([[h, h], [h, -h]])
    h = h.astype(np.int8)
    h.flags.writeable = False
    return h


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can construct order n (cheap: no matrix is built)."""
    return _plan(int(n)) is not None


def hadamard_matrix(n: int) -> np.ndarray:
    """Hadamard matrix of order n: float64, entries ±1, H Hᵀ = n I (a fresh, writable copy).

    Raises ConfigError when no construction here covers n (e.g. n = 3, 6).
    """
    return _hadamard_int8(int(n)).astype(np.float64)


@lru_cache(maxsize=64)
def _block_orders(n: int) -> tuple[int, ...]:
    """Greedy split of n into constructible Hadamard orders, largest first (1 and 2 always exist)."""
    orders, left = [], n
    while left:
        m = next(m for m in range(left, 0, -1) if has_hadamard(m))
        orders.append(m)
        left -= m
    return tuple(orders)


def block_hadamard(n: int) -> np.ndarray:
    """Orthogonal n × n rotation Q (Q Qᵀ = I): the normalised Hadamard H/√n when one exists.

    Fallback for orders with no construction (e.g. 3, 6, 7): block-diagonal with normalised
    Hadamard blocks of the largest constructible orders summing to n, chosen greedily (7 → 4+2+1,
    a leftover block of size 1 is [1]). It is still exactly orthogonal, so folding stays exact,
    but the rotation then mixes channels only within each block: an outlier is spread over its
    block, not over all n channels, which is weaker outlier suppression.
    """
    n = int(n)
    if n < 1:
        raise ConfigError(f"A rotation needs at least one channel, got {n}.")
    q = np.zeros((n, n))
    start = 0
    for m in _block_orders(n):
        q[start: start + m, start: start + m] = hadamard_matrix(m) / np.sqrt(m)
        start += m
    return q


def kron_factors(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, B), normalised Hadamard matrices of orders a·b = n with A ⊗ B = ``block_hadamard(n)``,
    or None when n has no construction here (block fallback) or no useful split (n < 4).

    Follows the construction: H_n = H_{2^k} ⊗ P_m (Sylvester doublings of a Paley core, or of [1]),
    and a pure Sylvester H_{2^k} = H_{2^i} ⊗ H_{2^j} is split as evenly as possible (i = ⌈k/2⌉).
    Applying A and B to the two axes of the channel vector reshaped to (a, b) costs a + b
    multiply-adds per element instead of n, and stores a² + b² numbers instead of n².
    """
    plan = _plan(int(n))
    if plan is None or n < 4:
        return None
    k, kind, _ = plan
    a = 1 << ((k + 1) // 2 if kind == 0 else k)
    b = n // a
    if a == 1 or b == 1:
        return None
    return hadamard_matrix(a) / np.sqrt(a), hadamard_matrix(b) / np.sqrt(b)


def random_signs(n: int, seed: int) -> np.ndarray:
    """n random signs (int8 ±1) drawn from ``numpy.random.default_rng(seed)``. Calibration draws a
    rotation's signs once; the recipe stores them (``quantface.recipe``), so nothing depends on NumPy
    keeping this stream. Version-1 recipes stored only the seed, and are read back through this."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=int(n)).astype(np.int8)


def signed_hadamard(signs: np.ndarray) -> np.ndarray:
    """Randomized Hadamard transform Q = diag(d) @ block_hadamard(n) for signs d ∈ {±1}^n; orthogonal.

    The sign flip comes *before* the mixing (x Q = (x ⊙ d) H/√n): flipping after mixing would leave
    every output magnitude unchanged, so only this order makes the spreading independent of the
    structure of x (the incoherence argument of QuIP# / QuaRot).
    """
    d = np.asarray(signs, dtype=np.float64)
    return d[:, None] * block_hadamard(d.size)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """``signed_hadamard(random_signs(n, seed))``: deterministic per (n, seed)."""
    return signed_hadamard(random_signs(n, seed))


# ----------------------------------------------------------------------------- torch side
def rotate_channels(x: torch.Tensor, q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rotate the channel vector at every position of x: x' = x Q along dimension ``dim``.

    ``dim`` is 1 for NCHW conv inputs, -1 for (..., C) linear inputs. Q is cast to x's dtype and
    device, and the result keeps x's dtype. Folding identity (Q orthogonal, Q Qᵀ = I): for a
    Linear y = x Wᵀ, with x' = x Q and W' = W Q (:func:`fold_into_weight`),
    x' W'ᵀ = x Q Qᵀ Wᵀ = x Wᵀ. A conv is the same dot product at every kernel tap, and zero
    padding stays zero under rotation, so conv(x Q, W Q) = conv(x, W); biases are unchanged.
    """
    q = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    if q.ndim != 2 or q.shape[0] != q.shape[1] or q.shape[0] != x.shape[dim]:
        raise ValueError(f"Rotation of shape {tuple(q.shape)} does not fit dimension {dim} of a "
                         f"tensor of shape {tuple(x.shape)}.")
    return torch.movedim(torch.movedim(x, dim, -1) @ q, -1, dim)


def fold_into_weight(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weight that undoes :func:`rotate_channels` of its input: W' = W Q on the input-channel axis.

    Works for Linear weights (out, in) and conv weights (out, in, kh, kw) (any kernel rank),
    applying Q to the input channels at every kernel position, so that
    conv(rotate_channels(x, q), fold_into_weight(w, q)) == conv(x, w) and
    rotate_channels(x, q, -1) @ fold_into_weight(w, q).T == x @ w.T. Grouped convolutions are not
    supported (their weight holds in/groups channels). Dtype-preserving.
    """
    if w.ndim < 2:
        raise ValueError(f"A weight needs (out, in, ...) dimensions, got shape {tuple(w.shape)}.")
    return rotate_channels(w, q, dim=1)
