"""Quantum-PEFT (budget/methods/quantum_peft.py): the Pauli circuit is the documented one (against a
dense kron-product reference), U_L and U_R have orthonormal columns for any size, the count is
(2L + 1) q - 2L per circuit plus K and equals what apply trains, every angle gets a gradient, the
layer starts as the base layer and merges exactly; the Lie-algebra side (unitary=lie) is the
exponential of its skew generator (against torch.linalg.matrix_exp of the whole N x N matrix) and
counts N K - K (K + 1) / 2 per side."""

from __future__ import annotations

import math
from functools import reduce

import pytest
import torch
from adabudget.arch import arch_of
from adabudget.config import ConfigError
from adabudget.export import merge_methods
from adabudget.methods import apply_method, count_method, method_config_from_dict
from adabudget.methods.quantum_peft import (
    QuantumPEFTLinear,
    circuit_columns,
    circuit_params,
    entangler_signs,
    lie_columns,
    lie_params,
    orthonormal_columns,
    qubits,
)
from conftest import tiny_batch as batch
from conftest import tiny_logits as logits
from conftest import tiny_model as build


def signs(q: int) -> torch.Tensor:
    return torch.stack([entangler_signs(q, 0), entangler_signs(q, 1)])


def dense_circuit(theta: torch.Tensor, q: int, depth: int) -> torch.Tensor:
    """The whole 2^q x 2^q matrix, gate by gate as kron products (qubit 0 = most significant bit)."""

    def ry(t):
        c, s = math.cos(t / 2), math.sin(t / 2)
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)

    def rot_layer(qubits_turned, angles):
        mats = [
            ry(next(angles)) if j in qubits_turned else torch.eye(2, dtype=torch.float64) for j in range(q)
        ]
        return reduce(torch.kron, mats)

    def cz_layer(parity):
        z = torch.ones(2**q, dtype=torch.float64)
        for a in range(parity, q - 1, 2):
            for x in range(2**q):
                if (x >> (q - 1 - a)) & 1 and (x >> (q - 2 - a)) & 1:
                    z[x] *= -1
        return torch.diag(z)

    angles = iter(theta.double().tolist())
    u = rot_layer(range(q), angles)
    for _ in range(depth if q >= 2 else 0):
        u = rot_layer(range(q), angles) @ cz_layer(0) @ u
        u = rot_layer(range(1, q - 1), angles) @ cz_layer(1) @ u
    assert next(angles, None) is None, "the circuit left angles unused"
    return u


@pytest.mark.parametrize("q, depth", [(1, 2), (2, 1), (3, 2), (4, 1), (5, 3)])
def test_circuit_matches_the_dense_reference(q, depth):
    torch.manual_seed(q)
    theta = torch.empty(circuit_params(2**q, depth), dtype=torch.float64).uniform_(-math.pi, math.pi)
    full = dense_circuit(theta, q, depth)
    torch.testing.assert_close(full.T @ full, torch.eye(2**q, dtype=torch.float64))
    cols = circuit_columns(theta, q, 2**q, depth, signs(q).double())
    torch.testing.assert_close(cols, full, atol=1e-12, rtol=0)


def test_one_qubit_worked_example():
    u = orthonormal_columns(torch.tensor([math.pi / 2]), 2, 1, 1, signs(1))
    torch.testing.assert_close(u, torch.full((2, 1), math.sqrt(0.5)))


SIZES = [(n, k) for n in (2, 3, 16, 17, 32, 96, 100, 128, 384, 1000, 1536) for k in (1, 4, 8) if k <= n]


@pytest.mark.parametrize("n, k", SIZES, ids=[f"{n}x{k}" for n, k in SIZES])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_columns_are_orthonormal(n, k, depth):
    torch.manual_seed(n * 10 + k)
    theta = torch.empty(circuit_params(n, depth)).uniform_(-math.pi, math.pi)
    u = orthonormal_columns(theta, n, k, depth, signs(max(qubits(n), 1)))
    assert u.shape == (n, k)
    torch.testing.assert_close(u.T @ u, torch.eye(k), atol=1e-5, rtol=0)


def paper_count(n: int, depth: int) -> int:
    q = math.ceil(math.log2(n))
    return (2 * depth + 1) * q - 2 * depth


def test_param_formula():
    assert [circuit_params(n, 1) for n in (2, 4, 8, 96, 128, 384, 1536)] == [1, 4, 7, 19, 19, 25, 31]
    for n in (4, 8, 96, 384, 1536, 4096):
        for depth in (0, 1, 3):
            assert circuit_params(n, depth) == paper_count(n, depth)
    # docs/methods.md#quantum-peft's example: a 384 x 1536 matrix, L = 1, K = 8
    assert circuit_params(384, 1) + circuit_params(1536, 1) + 8 == 64


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("depth", [0, 2])
def test_count_is_the_formula_and_what_apply_trains(arch_name, depth):
    model = build(arch_name)
    cfg = method_config_from_dict({"name": "quantum_peft", "r": 3, "depth": depth})
    arch = arch_of(model)
    counted = count_method(cfg, arch)
    wrapped = apply_method(model, cfg)
    formula = sum(
        paper_count(m.out_features, depth) + paper_count(m.in_features, depth) + 3 for m in wrapped.values()
    )
    assert counted == formula == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert formula < sum(3 * (m.in_features + m.out_features) for m in wrapped.values())  # below LoRA r = 3


def trained(arch_name="tiny-gpt2", seed=0, **knobs):
    model = build(arch_name, seed)
    cfg = method_config_from_dict({"name": "quantum_peft", "r": 4, **knobs})
    cfg.validate()
    return model, cfg, apply_method(model, cfg)


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_every_angle_gets_a_gradient(arch_name):
    model, _, wrapped = trained(arch_name, depth=2)
    with torch.no_grad():
        for m in wrapped.values():
            m.lambdas.normal_()  # at λ = 0 the angles' gradients are zero (ΔW = 0 for any U)
    model(**batch()).loss.backward()
    for name, m in wrapped.items():
        for pname in ("theta_left", "theta_right", "lambdas"):
            grad = getattr(m, pname).grad
            assert grad is not None and bool((grad != 0).all()), f"{name}.{pname}: {grad}"


def test_starts_as_the_base_layer_and_stays_orthogonal_while_training():
    base = build()
    model, _, wrapped = trained("tiny-bert")
    assert all(torch.equal(m.delta_weight(), torch.zeros_like(m.delta_weight())) for m in wrapped.values())
    torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    angles = {n: m.theta_left.detach().clone() for n, m in wrapped.items()}
    for _ in range(4):
        model(**batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, m in wrapped.items():
        assert not torch.equal(angles[name], m.theta_left), f"{name}: the angles did not train"
        for u in (m.u_left(), m.u_right()):
            torch.testing.assert_close(u.T @ u, torch.eye(m.rank), atol=1e-5, rtol=0)
        # ΔW = s U_L diag(λ) U_Rᵀ: its nonzero singular values are s |λ|
        sv = torch.linalg.svdvals(m.delta_weight().double())[: m.rank]
        expected = (m.lambdas.detach().double().abs() * m.scaling).sort(descending=True).values
        torch.testing.assert_close(sv, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_merge_equals_forward(arch_name):
    model, _, wrapped = trained(arch_name)
    with torch.no_grad():
        for m in wrapped.values():
            m.lambdas.normal_(0, 0.5)
    expected = logits(model)
    assert (expected - logits(build(arch_name))).abs().max() > 1e-3  # the update is not nothing
    merge_methods(model, wrapped, ["quantum_peft"])
    assert not any(isinstance(m, QuantumPEFTLinear) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("unitary", ["pauli", "lie"])
def test_without_autograd_u_is_computed_once_per_value_of_the_angles(unitary):
    """Evaluation and generation reuse U until the angles change (an optimiser step, a load);
    with autograd every forward builds it again, so gradients reach the angles."""
    torch.manual_seed(0)
    layer = QuantumPEFTLinear(torch.nn.Linear(12, 20), 3, 2, 4.0, unitary)
    with torch.no_grad():
        first = layer.u_left()
        assert layer.u_left() is first and layer.u_right() is layer.u_right()
    opt = torch.optim.SGD([layer.theta_left, layer.theta_right], lr=0.5)
    u = layer.u_left()
    assert u.requires_grad and u is not first
    (u.sum() + layer.u_right().sum()).backward()
    opt.step()  # in place: the version counter moves
    with torch.no_grad():
        moved = layer.u_left()
        assert not torch.allclose(moved, first)
        torch.testing.assert_close(moved, layer._build(layer.theta_left, 20, layer.signs_left))
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["theta_right"] += 0.3
        before = layer.u_right()
        layer.load_state_dict(state)
        after = layer.u_right()
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, layer._build(layer.theta_right, 12, layer.signs_right))


def test_rank_above_a_dimension_is_refused_by_count_and_apply():
    model = build("tiny-llama")  # k/v projections are 32 -> 16
    cfg = method_config_from_dict({"name": "quantum_peft", "r": 17})
    with pytest.raises(ConfigError, match=r"method.r=17.*<= 16"):
        count_method(cfg, arch_of(model))
    with pytest.raises(ConfigError, match=r"method.r=17"):
        apply_method(model, cfg)
    assert not any(isinstance(m, QuantumPEFTLinear) for m in model.modules())


def dense_generator(theta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The whole n x n skew-symmetric A = [[B, -Cᵀ], [C, 0]] the packed ``theta`` stands for."""
    m = k * (k - 1) // 2
    a = torch.zeros(n, n, dtype=torch.float64)
    rows, cols = torch.tril_indices(k, k, -1)
    a[rows, cols] = theta[:m].double()
    a[k:, :k] = theta[m:].double().view(n - k, k)
    return a - a.T


LIE_SIZES = [(2, 1), (3, 3), (8, 2), (17, 4), (64, 8), (100, 7), (5, 5)]


@pytest.mark.parametrize("n, k", LIE_SIZES, ids=[f"{n}x{k}" for n, k in LIE_SIZES])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_lie_columns_are_the_matrix_exponential(n, k, scale):
    torch.manual_seed(n + k)
    theta = torch.randn(lie_params(n, k), dtype=torch.float64) * scale
    a = dense_generator(theta, n, k)
    assert bool((a + a.T == 0).all()) and int((a != 0).sum()) == 2 * theta.numel()  # every value placed once
    u = lie_columns(theta, n, k)
    torch.testing.assert_close(u, torch.linalg.matrix_exp(a)[:, :k], atol=1e-10, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)


def test_lie_reaches_a_given_frame_and_its_count_is_the_stiefel_dimension():
    # The chart is onto the Stiefel manifold: fit a random target frame's projector by gradient descent
    torch.manual_seed(0)
    n, k = 12, 3
    target = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64)).Q
    theta = (torch.randn(lie_params(n, k), dtype=torch.float64) * 0.1).requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(400):
        u = lie_columns(theta, n, k)
        loss = (u @ u.T - target @ target.T).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-6
    assert [lie_params(n, k) for n, k in ((384, 8), (1536, 8), (4, 4), (9, 1))] == [3036, 12252, 6, 8]
    assert lie_params(384, 8) + lie_params(1536, 8) + 8 == 15296  # the docstring's MiniLM FFN matrix
    for n, k in ((768, 8), (4096, 16), (64, 64)):  # square: the notes' 2 N K - K² for the Taylor variant
        assert 2 * lie_params(n, k) + k == 2 * n * k - k * k


@pytest.mark.parametrize("n, k", [(384, 8), (1536, 8), (1536, 32)])
def test_lie_columns_are_orthonormal_in_float32_at_model_sizes(n, k):
    torch.manual_seed(n)
    layer = QuantumPEFTLinear(torch.nn.Linear(n, n), k, 1, 1.0, "lie")
    for u in (layer.u_left(), layer.u_right()):
        torch.testing.assert_close(u.T @ u, torch.eye(k), atol=1e-5, rtol=0)
        assert u[:k].abs().max() < 0.5  # the random start turns U off the first K basis vectors


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_lie_count_is_the_formula_and_what_apply_trains(arch_name):
    model = build(arch_name)
    cfg = method_config_from_dict({"name": "quantum_peft", "r": 3, "unitary": "lie"})
    counted = count_method(cfg, arch_of(model))
    wrapped = apply_method(model, cfg)
    formula = sum((m.out_features + m.in_features) * 3 - 3 * 4 + 3 for m in wrapped.values())
    assert counted == formula == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch_name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_lie_trains_stays_orthogonal_and_merges(arch_name):
    base = build(arch_name)
    model, _, wrapped = trained(arch_name, unitary="lie")
    torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)  # λ = 0: the base layer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    before = {n: (m.theta_left.detach().clone(), m.theta_right.detach().clone()) for n, m in wrapped.items()}
    for step in range(4):
        model(**batch()).loss.backward()
        if step == 1:  # λ has moved off zero by now, so every generator value has a gradient
            for name, m in wrapped.items():
                for p in (m.theta_left, m.theta_right, m.lambdas):
                    assert bool((p.grad != 0).all()), name
        opt.step()
        opt.zero_grad()
    for name, m in wrapped.items():
        assert not torch.equal(before[name][0], m.theta_left) and not torch.equal(
            before[name][1], m.theta_right
        )
        for u in (m.u_left(), m.u_right()):
            torch.testing.assert_close(u.T @ u, torch.eye(m.rank), atol=1e-5, rtol=0)
    expected = logits(model)
    merge_methods(model, wrapped, ["quantum_peft"])
    assert not any(isinstance(m, QuantumPEFTLinear) for m in model.modules())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "knobs, field",
    [({"r": 0}, "method.r"), ({"depth": -1}, "method.depth"), ({"unitary": "cayley"}, "method.unitary")],
)
def test_validate_names_the_field(knobs, field):
    with pytest.raises(ConfigError, match=field):
        method_config_from_dict({"name": "quantum_peft", **knobs}).validate()


def test_trains_and_exports_through_the_loop(compose_run):
    from pathlib import Path

    from adabudget.export import load_adapter
    from adabudget.training import train

    result = train(compose_run("method=quantum_peft", "method.r=4", "train.checkpoint=end"))
    assert result["status"] == "completed"
    model = build()
    cfg = method_config_from_dict({"name": "quantum_peft", "r": 4})
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    assert result["trainable_params"] == count_method(cfg, arch_of(model)) + head
    state = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["trainable"]
    lambdas = [v for n, v in state.items() if n.endswith("lambdas")]
    assert lambdas and all(v.abs().sum() > 0 for v in lambdas)  # λ left zero: nothing trained
    wrapped = load_adapter(build(), Path(result["run_dir"]) / "adapter")  # the generic adapter reloads
    assert all(isinstance(m, QuantumPEFTLinear) for m in wrapped.values())
