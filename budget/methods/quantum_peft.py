"""Quantum-PEFT (Koike-Akino et al., ICLR 2025): y = W0 x + b + s U_L diag(λ) U_Rᵀ x, with U_L (out, K)
and U_R (in, K) orthonormal columns computed from a few trainable values, not trained as matrices:
the angles of a Pauli circuit of RY rotations and CZ entanglers ((2L + 1) q - 2L per side,
q = ceil(log2 N)), or (``unitary=lie``) a skew generator confined to K columns, exponentiated
exactly through a 2K x 2K reduction (N K - K(K+1)/2 per side). The circuit, the Lie form's
derivation, the sources and the departures: docs/methods.md#quantum-peft.

Invariants:

- U_L and U_R have orthonormal columns by construction (to float rounding; no penalty), also for
  N not a power of two (circuit on the next power, first N rows re-orthonormalised by Cholesky QR).
- λ starts at zero, so the layer starts as the base layer; s = alpha / K as LoRA's.
- ``count`` is the exact trainable count: (2L + 1)(q_out + q_in) - 4L + K (Pauli) or
  (N_out + N_in) K - K(K+1) + K (Lie) per matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from adabudget.config import ConfigError
from adabudget.modules import find_targets, linear_shape, resolve_targets, set_module
from torch import nn


@dataclass
class QuantumPEFTConfig:
    name: str = "quantum_peft"
    target_modules: Optional[list] = None  # regex name suffixes; None = architecture default
    r: int = 8  # K: intrinsic rank, the used columns of U_L, U_R and the length of λ
    depth: int = 1  # L: entangling layers of each Pauli circuit (unitary=pauli only)
    unitary: str = "pauli"  # pauli: log2 N angles per side; lie: the Stiefel chart, N K - K(K+1)/2
    alpha: float = 16.0  # s = alpha / r
    layers: Optional[list] = None  # restrict to these block indices (None = all)

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r: must be >= 1, got {self.r}")
        if self.depth < 0:
            raise ConfigError(f"method.depth: must be >= 0 (0 = one layer of rotations), got {self.depth}")
        if self.unitary not in UNITARIES:
            raise ConfigError(
                f"method.unitary: unknown parameterisation {self.unitary!r}; "
                f"use one of {', '.join(UNITARIES)}"
            )


UNITARIES = ("pauli", "lie")


def qubits(n: int) -> int:
    """q = ceil(log2 n): the circuit acts on the next power of two (n = 1 has no circuit)."""
    return max(0, (n - 1).bit_length())


def circuit_params(n: int, depth: int) -> int:
    """Angles of one Pauli circuit for dimension n: (2L + 1) q - 2L (q = 1: 1; n = 1: 0)."""
    q = qubits(n)
    if q <= 1:
        return q
    return (2 * depth + 1) * q - 2 * depth


def lie_params(n: int, k: int) -> int:
    """Generator values of one Lie-algebra side: dim of the Stiefel manifold, n k - k (k + 1) / 2."""
    return n * k - k * (k + 1) // 2


def side_params(n: int, k: int, depth: int, unitary: str) -> int:
    """Trainable values that build one U (n, k)."""
    return circuit_params(n, depth) if unitary == "pauli" else lie_params(n, k)


def lie_columns(theta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """U = exp(A) E_K (n, k) for the generator packed in ``theta`` (docs/methods.md#quantum-peft).

    ``theta``: B's strictly lower triangle (k (k - 1) / 2, row by row) then C (n - k, k) row-major.
    """
    m = k * (k - 1) // 2
    rows, cols = torch.tril_indices(k, k, -1, device=theta.device)
    low = torch.zeros(k, k, dtype=torch.float64, device=theta.device).index_put(
        (rows, cols), theta[:m].double()
    )
    c = theta[m:].view(n - k, k)
    g = c.double().T @ c.double()  # CᵀC (k, k)
    eye, zero = torch.eye(k, dtype=torch.float64, device=theta.device), torch.zeros_like(g)
    mg = torch.cat([torch.cat([low - low.T, -g], 1), torch.cat([eye, zero], 1)])  # M G (2k, 2k)
    x = torch.linalg.matrix_exp(mg)[:, :k].to(theta.dtype)  # (2k, k)
    return torch.cat([x[:k], c @ x[k:]])  # Z x: E_K x_top + F C x_bottom


def entangler_signs(q: int, parity: int) -> torch.Tensor:
    """(2^q,) diagonal of the CZ gates on qubit pairs (parity, parity + 1), (parity + 2, ...)."""
    index = torch.arange(2**q)
    bits = [(index >> (q - 1 - j)) & 1 for j in range(q)]  # qubit j = axis j of a (2,) * q view
    odd = torch.zeros(2**q, dtype=torch.long)
    for a in range(parity, q - 1, 2):
        odd ^= bits[a] & bits[a + 1]
    return 1.0 - 2.0 * odd.float()


def rotations(theta: torch.Tensor) -> torch.Tensor:
    """(P, 2, 2): RY(θ) = [[cos θ/2, -sin θ/2], [sin θ/2, cos θ/2]] for every angle at once."""
    c, s = torch.cos(theta / 2), torch.sin(theta / 2)
    return torch.stack((c, -s, s, c), dim=-1).view(-1, 2, 2)


def _ry(state: torch.Tensor, qubit: int, rotation: torch.Tensor) -> torch.Tensor:
    """A (2, 2) rotation on one qubit of a (2^q, K) state (the qubit is bit q-1-j of the row index):
    one batched matmul over (before, qubit, after x K)."""
    return (rotation @ state.reshape(2**qubit, 2, -1)).reshape(state.shape)


def circuit_columns(theta: torch.Tensor, q: int, k: int, depth: int, signs: torch.Tensor) -> torch.Tensor:
    """The first k columns (2^q, k) of the depth-L circuit's orthogonal matrix
    (docs/methods.md#quantum-peft).

    ``signs``: (2, 2^q), the two entangler diagonals (``entangler_signs``). The rotations of all
    angles are built in one go and each gate is one matmul.
    """
    state = torch.eye(2**q, k, dtype=theta.dtype, device=theta.device)  # e_0 .. e_{k-1}
    angles = iter(rotations(theta).unbind())
    for j in range(q):
        state = _ry(state, j, next(angles))
    if q >= 2:
        for _ in range(depth):
            state = state * signs[0, :, None]
            for j in range(q):
                state = _ry(state, j, next(angles))
            state = state * signs[1, :, None]
            for j in range(1, q - 1):
                state = _ry(state, j, next(angles))
    return state


def orthonormal_columns(theta: torch.Tensor, n: int, k: int, depth: int, signs: torch.Tensor) -> torch.Tensor:
    """U (n, k) with UᵀU = I: the circuit's columns, cut to n rows and re-orthonormalised if n < 2^q."""
    q = qubits(n)
    if q == 0:
        return torch.ones(1, k, dtype=theta.dtype, device=theta.device)  # n = k = 1
    u = circuit_columns(theta, q, k, depth, signs)  # (2^q, k)
    if n == 2**q:
        return u
    u = u[:n]  # (n, k): columns no longer orthonormal; Cholesky QR twice restores them exactly
    for _ in range(2):
        chol = torch.linalg.cholesky(u.T @ u)  # (k, k) lower, uᵀu = L Lᵀ
        u = torch.linalg.solve_triangular(chol, u.T, upper=False).T  # u L^{-T}
    return u


class QuantumPEFTLinear(nn.Module):
    """y = W0 x + b + s U_L diag(λ) U_Rᵀ x; U_L, U_R from the angles ``theta_left``, ``theta_right``."""

    def __init__(self, base: nn.Module, r: int, depth: int, scaling: float, unitary: str = "pauli"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base)
        self.depth = depth
        self.scaling = scaling
        self.unitary = unitary
        dev = base.weight.device
        dt = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        self.theta_left = nn.Parameter(self._initial(self.out_features, r, dev, dt))
        self.theta_right = nn.Parameter(self._initial(self.in_features, r, dev, dt))
        self.lambdas = nn.Parameter(torch.zeros(r, device=dev, dtype=dt))  # λ (K,): zero, so ΔW = 0 at init
        self._frozen: dict = {}  # side -> (angles' identity and version, U): U without autograd
        for side, n in (("left", self.out_features), ("right", self.in_features)):
            q = max(qubits(n), 1)
            signs = torch.stack([entangler_signs(q, 0), entangler_signs(q, 1)]).to(dev, dt)
            self.register_buffer(f"signs_{side}", signs, persistent=False)  # (2, 2^q)

    def _initial(self, n: int, k: int, dev, dt) -> torch.Tensor:
        """Random frames: Pauli angles uniform in [-π, π); Lie generators N(0, (π/2)² / (n - k)), so
        C's columns have norm about π/2 and U turns most of the way off the first K basis vectors."""
        theta = torch.empty(side_params(n, k, self.depth, self.unitary), device=dev, dtype=dt)
        if self.unitary == "pauli":
            return theta.uniform_(-math.pi, math.pi)
        return theta.normal_(0.0, (math.pi / 2) / math.sqrt(max(n - k, 1)))

    @property
    def rank(self) -> int:
        return self.lambdas.shape[0]

    def _columns(self, side: str, theta: torch.Tensor, n: int, signs: torch.Tensor) -> torch.Tensor:
        """U from its angles; without autograd (evaluation, generation) computed once per value of
        the angles (their version counter moves with every in-place update: optimiser, load)."""
        if torch.is_grad_enabled() and theta.requires_grad:
            return self._build(theta, n, signs)
        key = (theta.data_ptr(), theta._version, theta.dtype, theta.device)
        cached = self._frozen.get(side)
        if cached is None or cached[0] != key:
            cached = (key, self._build(theta, n, signs).detach())
            self._frozen[side] = cached
        return cached[1]

    def _build(self, theta: torch.Tensor, n: int, signs: torch.Tensor) -> torch.Tensor:
        if self.unitary == "lie":
            return lie_columns(theta, n, self.rank)
        return orthonormal_columns(theta, n, self.rank, self.depth, signs)

    def u_left(self) -> torch.Tensor:  # (out, K)
        return self._columns("left", self.theta_left, self.out_features, self.signs_left)

    def u_right(self) -> torch.Tensor:  # (in, K)
        return self._columns("right", self.theta_right, self.in_features, self.signs_right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        u_left, u_right = self.u_left(), self.u_right()
        h = F.linear(x.to(u_right.dtype), u_right.T) * (self.lambdas * self.scaling)  # (..., K)
        if (
            out.dtype == h.dtype == u_left.dtype
        ):  # out += h U_Lᵀ in one GEMM, no (..., out) temporary (as LoRALinear)
            return out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), u_left.T).view(out.shape)
        return out + F.linear(h, u_left).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s U_L diag(λ) U_Rᵀ in nn.Linear layout (out, in)."""
        return (self.u_left() * (self.lambdas * self.scaling)) @ self.u_right().T


def apply(
    model: nn.Module, cfg: QuantumPEFTConfig, layers: list[int] | None = None
) -> dict[str, QuantumPEFTLinear]:
    layers = layers if layers is not None else cfg.layers
    patterns = resolve_targets(model, cfg.target_modules, "method.target_modules")
    names = find_targets(model, patterns, "method.target_modules", layers)
    for name in names:
        _check_rank(cfg, name, *linear_shape(model.get_submodule(name))[:2])
    wrapped = {}
    for name in names:
        base = model.get_submodule(name)
        base.weight.requires_grad_(False)
        wrapped[name] = QuantumPEFTLinear(base, cfg.r, cfg.depth, cfg.alpha / cfg.r, cfg.unitary)
        set_module(model, name, wrapped[name])
    return wrapped


def count(cfg: QuantumPEFTConfig, arch, layers: list[int] | None = None) -> int:
    """Per adapted matrix: ((2L + 1) q_out - 2L) + ((2L + 1) q_in - 2L) + K, q = ceil(log2 dim)
    (Pauli), or (out + in) K - K (K + 1) + K (Lie)."""
    layers = layers if layers is not None else cfg.layers
    patterns = cfg.target_modules or arch.default_targets()
    total = 0
    for name, s in arch.match_linears(patterns, layers):
        _check_rank(cfg, name, s.in_features, s.out_features)
        total += cfg.r + sum(
            side_params(n, cfg.r, cfg.depth, cfg.unitary) for n in (s.out_features, s.in_features)
        )
    return total


def _check_rank(cfg: QuantumPEFTConfig, name: str, in_features: int, out_features: int) -> None:
    if cfg.r > min(in_features, out_features):
        raise ConfigError(
            f"method.r={cfg.r}: quantum_peft needs K orthonormal columns in both dimensions of {name} "
            f"({out_features} x {in_features}); use method.r <= {min(in_features, out_features)}"
        )


@torch.no_grad()
def merge(model: nn.Module, modules: dict) -> None:
    """W0 += s U_L diag(λ) U_Rᵀ (transposed for Conv1D), then put the base layer back."""
    for name, layer in modules.items():
        if not isinstance(layer, QuantumPEFTLinear):
            continue
        delta = layer.delta_weight()  # (out, in)
        layer.base.weight.add_((delta.T if layer.fan_in_fan_out else delta).to(layer.base.weight.dtype))
        set_module(model, name, layer.base)
