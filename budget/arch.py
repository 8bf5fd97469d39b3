"""What a PEFT method needs to know about a backbone, read from its HF config alone.

``arch_from_config(config)`` describes one transformer block of a supported family
(BERT, RoBERTa, DeBERTa-v2, GPT-2, LLaMA and its relatives) by *role*: which linear layer
computes the query, key, value, attention output, FFN input and FFN output, their shapes
and biases, the norms, where the self-attention module sits and where the task head reads
the sequence. Methods wrap modules by role, so one method file serves every family, and
``count_trainable`` counts a method's parameters from these shapes before a model exists.

Roles: ``q``, ``k``, ``v`` (``qkv`` for GPT-2's fused ``c_attn``, h -> 3h), ``o``,
``ffn_in`` (LLaMA has two: gate and up), ``ffn_out``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from adabudget.config import ConfigError

FAMILIES = {
    "bert": "bert",
    "roberta": "bert",
    "deberta-v2": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}
# base_model_prefix of the *ForSequenceClassification classes
PREFIX = {"bert": "bert", "roberta": "roberta", "deberta-v2": "deberta", "gpt2": "transformer"}

# The paper adapts every weight matrix of every layer (Table 7: query, key, value,
# attention output, intermediate, layer output = 6 x L matrices). Patterns match a
# module-name suffix as a regex: ``(.*\.)?<pattern>`` must match the whole name.
DEFAULT_TARGETS = {
    "bert": [
        "query",
        "key",
        "value",
        r"attention\.output\.dense",
        r"intermediate\.dense",
        r"layer\.\d+\.output\.dense",
    ],
    "deberta-v2": [
        "query_proj",
        "key_proj",
        "value_proj",
        r"attention\.output\.dense",
        r"intermediate\.dense",
        r"layer\.\d+\.output\.dense",
    ],
    "gpt2": [r"attn\.c_attn", r"attn\.c_proj", r"mlp\.c_fc", r"mlp\.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
DEFAULT_TARGETS["roberta"] = DEFAULT_TARGETS["bert"]
DEFAULT_TARGETS["deberta"] = DEFAULT_TARGETS["deberta-v2"]
DEFAULT_TARGETS["mistral"] = DEFAULT_TARGETS["llama"]
DEFAULT_TARGETS["qwen2"] = DEFAULT_TARGETS["llama"]


@dataclass(frozen=True)
class LinearSpec:
    rel: str  # name inside the block, e.g. "attention.self.query"
    role: str  # q | k | v | qkv | o | ffn_in | ffn_out | other
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class NormSpec:
    rel: str
    size: int
    bias: bool


@dataclass
class Arch:
    model_type: str
    family: str  # bert | gpt2 | llama
    num_layers: int  # L
    hidden: int  # h
    intermediate: int  # FFN width
    num_heads: int
    num_kv_heads: int
    head_dim: int
    prefix: str  # base model attribute: "bert", "transformer", "model", ...
    blocks: str  # module path of the block list, e.g. "bert.encoder.layer"
    attention: str  # self-attention module inside a block (its forward calls the attention interface)
    linears: list[LinearSpec] = field(default_factory=list)  # per block
    norms: list[NormSpec] = field(default_factory=list)  # per block
    outside_biases: dict[str, int] = field(default_factory=dict)  # backbone biases outside blocks
    outside_params: int = 0  # every other backbone parameter outside blocks (embeddings, final norm)
    outside_linears: dict[str, LinearSpec] = field(default_factory=dict)  # full name -> spec (poolers)
    head: str = "classifier"  # module whose input is the final hidden sequence (pooler / classifier / score)
    head_params: int = 0  # trainable task-head parameters (train_head)
    prefix_attention: bool = True  # attention goes through HF's attention interface (prefix tuning)
    # a causal LM's output embedding when it is not tied to the input one (arch_of sees the model;
    # a config alone cannot tell a causal LM from a classifier): what full fine-tuning adds
    lm_head_params: int = 0

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def by_role(self, *roles: str) -> list[LinearSpec]:
        return [s for s in self.linears if s.role in roles]

    def layers(self, layers: list[int] | None) -> list[int]:
        """The block indices a method applies to (all when ``layers`` is None); ConfigError if out of
        range."""
        if layers is None:
            return list(range(self.num_layers))
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(
                f"method.layers: block indices {bad} out of range for this {self.model_type} with "
                f"{self.num_layers} blocks; use indices in [0, {self.num_layers - 1}]"
            )
        return list(layers)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def match_linears(
        self, patterns: list[str], layers: list[int] | None = None
    ) -> list[tuple[str, LinearSpec]]:
        """(full name, spec) of the linear layers ``adabudget.modules.find_targets`` would pick,
        analytically."""
        regexes = [re.compile(rf"(.*\.)?(?:{p})") for p in patterns]
        names = [(f"{self.block(i)}.{s.rel}", s) for i in self.layers(layers) for s in self.linears]
        if layers is None:
            names += list(self.outside_linears.items())
        return [(n, s) for n, s in names if any(r.fullmatch(n) for r in regexes)]

    def default_targets(self) -> list[str]:
        return DEFAULT_TARGETS[self.model_type]

    def block_params(self) -> int:
        per = sum(s.in_features * s.out_features + s.bias * s.out_features for s in self.linears)
        per += sum(n.size * (1 + n.bias) for n in self.norms)
        return per

    def backbone_params(self) -> int:
        """All backbone parameters (task head excluded), for budgets given as % of the backbone."""
        return self.num_layers * self.block_params() + self.outside_params + sum(self.outside_biases.values())


def arch_from_config(config, num_labels: int | None = None) -> Arch:
    """Describe the backbone of an HF ``PretrainedConfig``; ConfigError for unsupported families."""
    mtype = getattr(config, "model_type", "") or ""
    if mtype not in FAMILIES:
        raise ConfigError(
            f"model: model_type '{mtype}' is not a supported backbone for hybrid PEFT methods; "
            f"supported: {sorted(FAMILIES)}"
        )
    n = num_labels if num_labels is not None else config.num_labels
    family = FAMILIES[mtype]
    if family == "bert":
        return _bert_family(config, mtype, n)
    if family == "gpt2":
        return _gpt2(config, n)
    return _llama(config, mtype, n)


def arch_of(model) -> Arch:
    arch = arch_from_config(model.config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        arch.lm_head_params = sum(p.numel() for p in head.parameters())
    return arch


def _bert_family(c, mtype: str, n: int) -> Arch:
    h, i = c.hidden_size, c.intermediate_size
    proj = "_proj" if mtype == "deberta-v2" else ""
    linears = [
        LinearSpec(f"attention.self.query{proj}", "q", h, h, True),
        LinearSpec(f"attention.self.key{proj}", "k", h, h, True),
        LinearSpec(f"attention.self.value{proj}", "v", h, h, True),
    ]
    prefix = PREFIX[mtype]
    emb = getattr(c, "embedding_size", h) or h
    outside_biases = {f"{prefix}.embeddings.LayerNorm.bias": h}
    outside = c.vocab_size * emb + h  # word embeddings, embedding LayerNorm weight
    outside_linears: dict[str, LinearSpec] = {}
    if mtype == "deberta-v2":
        if getattr(c, "conv_kernel_size", 0):
            raise ConfigError(
                "model: DeBERTa-v2 with conv_kernel_size > 0 is not supported by the hybrid methods"
            )
        if getattr(c, "position_biased_input", True):
            outside += c.max_position_embeddings * emb
        if c.type_vocab_size > 0:
            outside += c.type_vocab_size * emb
        if emb != h:
            outside += emb * h  # embed_proj, no bias
            outside_linears[f"{prefix}.embeddings.embed_proj"] = LinearSpec(
                "embed_proj", "other", emb, h, False
            )
        pos_att = getattr(c, "pos_att_type", None) or []
        pos_att = pos_att.lower().split("|") if isinstance(pos_att, str) else [p.lower() for p in pos_att]
        if c.relative_attention:
            buckets = getattr(c, "position_buckets", -1)
            max_rel = getattr(c, "max_relative_positions", -1)
            max_rel = max_rel if max_rel >= 1 else c.max_position_embeddings
            outside += (buckets * 2 if buckets > 0 else max_rel * 2) * h  # rel_embeddings
            if not getattr(c, "share_att_key", False):
                if "c2p" in pos_att:
                    linears.append(LinearSpec("attention.self.pos_key_proj", "other", h, h, True))
                if "p2c" in pos_att:
                    linears.append(LinearSpec("attention.self.pos_query_proj", "other", h, h, True))
        if "layer_norm" in [x.strip() for x in getattr(c, "norm_rel_ebd", "none").lower().split("|")]:
            outside += h
            outside_biases[f"{prefix}.encoder.LayerNorm.bias"] = h
        # The ContextPooler is freshly initialised, so it is part of the task head
        # (adabudget.modules.is_head): trained with model.train_head, never adapted.
        head, head_params = "pooler", h * h + h + h * n + n
    else:
        outside += c.max_position_embeddings * emb + c.type_vocab_size * emb
        if mtype == "bert":
            outside += h * h  # pooler.dense (pretrained, part of the backbone)
            outside_biases[f"{prefix}.pooler.dense.bias"] = h
            outside_linears[f"{prefix}.pooler.dense"] = LinearSpec("pooler.dense", "other", h, h, True)
            head, head_params = f"{prefix}.pooler", h * n + n
        else:
            head, head_params = "classifier", h * h + h + h * n + n  # dense + out_proj
    linears += [
        LinearSpec("attention.output.dense", "o", h, h, True),
        LinearSpec("intermediate.dense", "ffn_in", h, i, True),
        LinearSpec("output.dense", "ffn_out", i, h, True),
    ]
    norms = [NormSpec("attention.output.LayerNorm", h, True), NormSpec("output.LayerNorm", h, True)]
    return Arch(
        model_type=mtype,
        family="bert",
        num_layers=c.num_hidden_layers,
        hidden=h,
        intermediate=i,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_attention_heads,
        head_dim=h // c.num_attention_heads,
        prefix=prefix,
        blocks=f"{prefix}.encoder.layer",
        attention="attention.self",
        linears=linears,
        norms=norms,
        outside_biases=outside_biases,
        outside_params=outside,
        outside_linears=outside_linears,
        head=head,
        head_params=head_params,
        prefix_attention=mtype != "deberta-v2",
    )


def _gpt2(c, n: int) -> Arch:
    h = c.n_embd
    i = c.n_inner or 4 * h
    linears = [
        LinearSpec("attn.c_attn", "qkv", h, 3 * h, True),
        LinearSpec("attn.c_proj", "o", h, h, True),
        LinearSpec("mlp.c_fc", "ffn_in", h, i, True),
        LinearSpec("mlp.c_proj", "ffn_out", i, h, True),
    ]
    norms = [NormSpec("ln_1", h, True), NormSpec("ln_2", h, True)]
    return Arch(
        model_type="gpt2",
        family="gpt2",
        num_layers=c.n_layer,
        hidden=h,
        intermediate=i,
        num_heads=c.n_head,
        num_kv_heads=c.n_head,
        head_dim=h // c.n_head,
        prefix="transformer",
        blocks="transformer.h",
        attention="attn",
        linears=linears,
        norms=norms,
        outside_biases={"transformer.ln_f.bias": h},
        outside_params=c.vocab_size * h + c.n_positions * h + h,
        head="score",
        head_params=h * n,
    )


def _llama(c, mtype: str, n: int) -> Arch:
    h, i = c.hidden_size, c.intermediate_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    qkv_bias = getattr(c, "attention_bias", False) or mtype == "qwen2"
    o_bias = getattr(c, "attention_bias", False)
    mlp_bias = getattr(c, "mlp_bias", False)
    linears = [
        LinearSpec("self_attn.q_proj", "q", h, heads * hd, qkv_bias),
        LinearSpec("self_attn.k_proj", "k", h, kv * hd, qkv_bias),
        LinearSpec("self_attn.v_proj", "v", h, kv * hd, qkv_bias),
        LinearSpec("self_attn.o_proj", "o", heads * hd, h, o_bias),
        LinearSpec("mlp.gate_proj", "ffn_in", h, i, mlp_bias),
        LinearSpec("mlp.up_proj", "ffn_in", h, i, mlp_bias),
        LinearSpec("mlp.down_proj", "ffn_out", i, h, mlp_bias),
    ]
    # RMSNorm: a weight and no bias
    norms = [NormSpec("input_layernorm", h, False), NormSpec("post_attention_layernorm", h, False)]
    return Arch(
        model_type=mtype,
        family="llama",
        num_layers=c.num_hidden_layers,
        hidden=h,
        intermediate=i,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        prefix="model",
        blocks="model.layers",
        attention="self_attn",
        linears=linears,
        norms=norms,
        outside_biases={},
        outside_params=c.vocab_size * h + h,
        head="score",
        head_params=h * n,
    )
