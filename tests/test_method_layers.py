"""The base layers of LoRA, the serial and parallel adapters and prefix-tuning compute their own
method only; their consumers subclass them: UniPELT's gated layers (``adabudget.methods.unipelt``)
and the supernet's sliced ones (``Sliced...`` in each method file, built by ``search.supernet``).

- the base layers carry no consumer flag (``gate``, ``active``) and refuse ``set_active``;
- a sliced layer at size k computes the stand-alone layer of size k holding its leading weights,
  size 0 switches it off;
- a gated layer scales its method's contribution by its per-example gate;
- the state_dict keys of UniPELT (gates included) are those of the checkpoints saved before.
"""

from __future__ import annotations

import pytest
import torch
from adabudget.methods import apply_method, method_config_from_dict
from adabudget.methods.adapter import BottleneckAdapter, SlicedBottleneckAdapter
from adabudget.methods.lora import LoRALinear
from adabudget.methods.parallel_adapter import ParallelAdapter, SlicedParallelAdapter
from adabudget.methods.prefix import PrefixKV, SlicedPrefixKV
from adabudget.methods.unipelt import GatedBottleneckAdapter, GatedLoRALinear, GatedPrefixKV
from conftest import tiny_model
from torch import nn

UNIPELT = {"name": "unipelt", "lora_r": 4, "prefix_length": 3, "adapter_bottleneck": 8}


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn at random: zero-initialised W_up / B would hide a wrong slice or gate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def hidden(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the base layers
def base_layers() -> dict[str, nn.Module]:
    return {
        "lora": LoRALinear(nn.Linear(6, 6), 2, 1.0),
        "adapter": BottleneckAdapter(6, 4, "relu"),
        "parallel_adapter": ParallelAdapter(6, 4, 6, 2.0, "relu"),
        "prefix": PrefixKV(3, 2, 4, hidden=8),
        "prefix-reparam": PrefixKV(3, 2, 4, hidden=8, reparam_dim=5),
    }


@pytest.mark.parametrize("kind", list(base_layers()))
def test_base_layers_carry_no_consumer_flags(kind):
    layer = base_layers()[kind]
    assert not hasattr(layer, "gate") and not hasattr(layer, "active")


@pytest.mark.parametrize("method", ["adapter", "parallel_adapter", "prefix"])
def test_the_methods_build_their_base_layers_and_refuse_slicing(method):
    """A plain run builds the base class (no gate, no slice), and ``set_active`` says what to build."""
    from adabudget.methods import adapter, parallel_adapter, prefix

    files = {"adapter": adapter, "parallel_adapter": parallel_adapter, "prefix": prefix}
    wanted = {"adapter": "SlicedBottleneckAdapter", "parallel_adapter": "SlicedParallelAdapter"}
    model = tiny_model("tiny-bert")
    wrapped = apply_method(model, method_config_from_dict({"name": method}))
    assert wrapped
    for module in wrapped.values():
        assert type(module) in (BottleneckAdapter, ParallelAdapter, PrefixKV)
        assert not hasattr(module, "gate") and not hasattr(module, "active")
        with pytest.raises(TypeError, match=wanted.get(method, "SlicedPrefixKV")):
            files[method].set_active(module, 1)


# ---------------------------------------------------------------- the sliced layers
def test_sliced_adapter_is_the_standalone_narrow_adapter():
    from adabudget.methods.adapter import set_active

    big = randomised(SlicedBottleneckAdapter(6, 5, "gelu"))
    small = BottleneckAdapter(6, 3, "gelu")
    with torch.no_grad():
        small.down.weight.copy_(big.down.weight[:3])
        small.down.bias.copy_(big.down.bias[:3])
        small.up.weight.copy_(big.up.weight[:, :3])
        small.up.bias.copy_(big.up.bias)
    y = hidden(2, 4, 6)
    whole = big(y)
    assert set_active(big, 3) == {
        "down.weight": (slice(0, 3),),
        "down.bias": (slice(0, 3),),
        "up.weight": (slice(None), slice(0, 3)),
        "up.bias": (slice(None),),
    }
    torch.testing.assert_close(big(y), small(y), rtol=0, atol=0)
    assert set_active(big, 0) == {} and torch.equal(big(y), y)  # off: the identity
    set_active(big, None)
    assert big.active is None and torch.equal(big(y), whole)
    with pytest.raises(ValueError, match="outside 0..5"):
        set_active(big, 6)


def test_sliced_parallel_adapter_is_the_standalone_narrow_adapter():
    """Through its hooks on a two-linear sublayer: x captured at the first, s · adapter(x) added
    after the last; d = 0 leaves the sublayer alone and still drops the captured x."""
    from adabudget.methods.parallel_adapter import set_active

    def sublayer(adapter_cls, d):
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        adapter = adapter_cls(6, d, 6, 2.0, "relu")
        adapter.attach(block, block[0], block[2])
        return block, adapter

    block, big = sublayer(SlicedParallelAdapter, 5)
    alone, small = sublayer(ParallelAdapter, 3)
    randomised(big)
    with torch.no_grad():
        small.down.weight.copy_(big.down.weight[:3])
        small.down.bias.copy_(big.down.bias[:3])
        small.up.weight.copy_(big.up.weight[:, :3])
        small.up.bias.copy_(big.up.bias)
    x = hidden(2, 4, 6)
    regions = set_active(big, 3)
    assert regions["up.weight"] == (slice(None), slice(0, 3)) and regions["up.bias"] == (slice(None),)
    torch.testing.assert_close(block(x), alone(x), rtol=0, atol=0)
    assert set_active(big, 0) == {}
    big.detach()
    without = block(x)  # the sublayer with no adapter at all
    big.attach(block, block[0], block[2])
    assert torch.equal(block(x), without) and big._x is None


def test_sliced_prefix_is_the_standalone_short_prefix():
    from adabudget.methods.prefix import set_active

    big = randomised(SlicedPrefixKV(6, 2, 4, hidden=8))
    small = PrefixKV(2, 2, 4, hidden=8)
    with torch.no_grad():
        small.key.copy_(big.key[:, :2])
        small.value.copy_(big.value[:, :2])
    key, value = hidden(3, 2, 5, 4), hidden(3, 2, 5, 4, seed=2)  # (B, kvh, T, hd)
    assert set_active(big, 2) == {"key": (slice(None), slice(0, 2)), "value": (slice(None), slice(0, 2))}
    for got, want in zip(big.keys_values(key, value), small.keys_values(key, value)):
        assert got.shape == (3, 2, 2, 4)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set_active(big, 0) == {} and big.keys_values(key, value) is None  # no prefix in this layer
    assert small.keys_values(key, value) is not None  # the base layer always prefixes


# ---------------------------------------------------------------- the gated layers
@pytest.fixture(scope="module")
def unipelt_bert():
    model = tiny_model("tiny-bert")
    wrapped = apply_method(model, method_config_from_dict(UNIPELT))
    return model, wrapped


def test_unipelt_builds_gated_subclasses(unipelt_bert):
    _, wrapped = unipelt_bert
    kinds = {type(m) for m in wrapped.values()}
    assert kinds == {GatedLoRALinear, GatedBottleneckAdapter, GatedPrefixKV}
    assert all(hasattr(m, "gate") and not hasattr(m, "active") for m in wrapped.values())


def test_gated_adapter_scales_the_adapter_per_example(unipelt_bert):
    """y' = y + G_A(y) (W_up f(W_down y + b_down) + b_up); a closed gate leaves y alone."""
    _, wrapped = unipelt_bert
    adapter = next(m for m in wrapped.values() if isinstance(m, GatedBottleneckAdapter))
    y = hidden(2, 5, adapter.up.out_features)
    with torch.no_grad():
        saved = {k: v.clone() for k, v in adapter.state_dict().items()}
        randomised(adapter.up)
        delta = adapter.up(torch.relu(adapter.down(y)))  # (2, 5, h)
        gate = adapter.gate(y)  # (2, 1, 1)
        assert gate.shape == (2, 1, 1) and not torch.allclose(gate[0], gate[1])
        torch.testing.assert_close(adapter(y), y + gate * delta)
        adapter.gate.proj.bias.fill_(-1e4)
        torch.testing.assert_close(adapter(y), y)
        adapter.load_state_dict(saved)


def test_gated_prefix_scales_keys_and_values_per_example(unipelt_bert):
    """G_P P_k, G_P P_v with the gate its pre-hook computed from the attention input, taken once."""
    _, wrapped = unipelt_bert
    kv = next(m for m in wrapped.values() if isinstance(m, GatedPrefixKV))
    key = value = hidden(2, kv.num_kv_heads, 5, kv.head_dim)
    plain_key, plain_value = PrefixKV.keys_values(kv, key, value)  # the ungated prefix, (2, kvh, l, hd)
    kv.gate._value = torch.tensor([0.25, 0.75]).view(2, 1, 1)  # what the pre-hook would have stored
    got_key, got_value = kv.keys_values(key, value)
    torch.testing.assert_close(got_key[0], 0.25 * plain_key[0])
    torch.testing.assert_close(got_value[1], 0.75 * plain_value[1])
    with pytest.raises(RuntimeError, match="pre-hook"):  # popped: a second forward needs a new gate
        kv.keys_values(key, value)


def test_unipelt_state_dict_keys_are_those_of_saved_checkpoints(unipelt_bert):
    """The keys of block 0 as checkpoints written before the gated subclasses hold them."""
    model, _ = unipelt_bert
    block = "bert.encoder.layer.0."
    keys = sorted(
        k[len(block) :]
        for k in model.state_dict()
        if k.startswith(block) and ("adabudget" in k or "gate" in k or k.endswith((".A", ".B")))
    )
    assert keys == [
        "adabudget_adapter_ffn.down.bias",
        "adabudget_adapter_ffn.down.weight",
        "adabudget_adapter_ffn.gate.proj.bias",
        "adabudget_adapter_ffn.gate.proj.weight",
        "adabudget_adapter_ffn.up.bias",
        "adabudget_adapter_ffn.up.weight",
        "attention.self.adabudget_prefix.gate.proj.bias",
        "attention.self.adabudget_prefix.gate.proj.weight",
        "attention.self.adabudget_prefix.key",
        "attention.self.adabudget_prefix.value",
        "attention.self.query.A",
        "attention.self.query.B",
        "attention.self.query.gate.proj.bias",
        "attention.self.query.gate.proj.weight",
        "attention.self.value.A",
        "attention.self.value.B",
        "attention.self.value.gate.proj.bias",
        "attention.self.value.gate.proj.weight",
    ]
