"""Per-architecture knowledge for the analytic memory model: parameter shapes and activation tables.

Each family contributes two things:

- a shape function: a transformers config -> `ModelShapes`, the numel of every parameter tensor of
  the input side (embeddings, learned positions, OPT's project_in), of one decoder block, and of
  the output side (final norm, OPT's project_out, the output head — the server's own copy when the
  head is tied to the input embedding);
- an `ActivationTable`: how many activation tensors of each per-token width one block stores for
  backward, and how many it holds at once in a forward pass without a graph.

The tables were counted with `hosl.memory.measure` (exact live-tensor bytes) on tiny random models
of transformers 5.x on CPU, no KV cache, dropout off, and fitted exactly over shapes that vary
batch, length, hidden, intermediate, heads, KV heads and head_dim (eager in float32 and bfloat16,
sdpa in float32 and checked in bfloat16). There is one table per attention kernel: "eager"
(stores the (B, heads, L, L) probabilities) and "sdpa" (PyTorch's fused
scaled_dot_product_attention, which stores none). Whole-model peaks at the real SmolLM2-135M and
OPT-125M shapes (batch 4 x 512 tokens) agree with measurement within 1.1%. The Llama and OPT
tables were then checked op by op against hosl's own split stages and training loops (every mode,
MLP widths 2H and 4H — OPT's real ratio — see tests/test_memory_split.py), which fixed the MLP
halves of the forward and backward working sets, the rotary cos/sin tables Llama keeps alive
through its blocks, and the input side: hosl's embedding stages return one (B, L, H) tensor,
which the part keeps while its blocks run. Kernels other than
these change the counts: fused RMSNorm/GELU kernels store fewer copies, CUDA layer norm keeps its
statistics in float32, a KV cache adds K and V per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from hosl.errors import ConfigError


@dataclass(frozen=True)
class Term:
    """Activation tensors of one per-token width.

    `unit` names the width: "h" hidden, "q" heads·head_dim, "kv" kv_heads·head_dim, "kvr" the
    same but only with grouped-query attention (K and V before eager attention repeats them),
    "i" MLP intermediate, "s" heads·L (attention scores: B·heads·L·L elements), "mask" L (a
    (B, 1, L, L) attention mask), "heads" (per-head statistics such as SDPA's logsumexp),
    "hd" head_dim (rotary cos/sin tables), "row" 1 (per-token statistics such as a norm's
    rstd). `n` tensors are in the activation dtype, `n32` always in float32, and `n_up` are
    float32 copies that exist only when the activation dtype is 16-bit (a kernel upcasting its
    input: RMSNorm, softmax(dtype=float32)).
    """

    unit: str
    n: float = 0.0
    n32: float = 0.0
    n_up: float = 0.0

    def bytes_per_token(self, widths: dict[str, int], act_bytes: int) -> float:
        upcast = self.n_up * 4 if act_bytes < 4 else 0.0
        return widths[self.unit] * (self.n * act_bytes + self.n32 * 4 + upcast)


@dataclass(frozen=True)
class ActivationTable:
    """Activation counts of one family (eager attention, CPU kernels), per block and at the ends.

    layer_stored: tensors one block saves for backward (its output residual included).
    forward_work: alternatives (attention half, MLP half); the larger is what a block holds at
        once in a forward pass without a graph, beyond the residual stream entering it.
    backward_work: alternatives likewise for one block's backward, beyond its stored activations,
        the incoming gradient and its new parameter gradients (the MLP half: the gradient of the
        MLP's wide activation and the one its nonlinearity's backward makes, 2 x i).
    embedding_stored: what the input side saves for backward (block 0's input).
    embedding_held / embedding_held_graph: what the input side keeps alive until the last block
        has run (hosl's parts keep the embedding stage's output while their blocks run), beyond
        the residual stream without a graph, beyond `embedding_stored` with one.
    head_stored: the final norm's outputs and statistics (logits are counted separately).
    mask: alive through a forward of any block: the (B, 1, L, L) additive causal mask, and
        Llama's rotary cos/sin tables, computed once per part.
    frozen_unsaved: what a block no longer stores when its base weights are frozen (LoRA):
        inputs kept only for a weight's gradient (Llama: down_proj's and o_proj's inputs and
        the norms' normalised outputs; OPT: fc1's input), measured with adapters on q_proj and
        v_proj under sdpa (what the adapters themselves store is counted apart,
        hosl.memory.adapters); the eager tables leave it empty, over-counting a little.
    """

    layer_stored: tuple[Term, ...]
    forward_work: tuple[tuple[Term, ...], ...]
    backward_work: tuple[tuple[Term, ...], ...]
    embedding_stored: tuple[Term, ...]
    embedding_held: tuple[Term, ...]
    embedding_held_graph: tuple[Term, ...]
    head_stored: tuple[Term, ...]
    mask: tuple[Term, ...] = (Term("mask", n=1),)
    frozen_unsaved: tuple[Term, ...] = ()


@dataclass(frozen=True)
class ModelShapes:
    """What the analytic model needs to know about one model, independent of the batch."""

    family: str
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embed_dim: int  # width of the token embedding and the head (OPT's word_embed_proj_dim)
    tied: bool
    embedding_tensors: tuple[int, ...]  # client side, numel per tensor
    layer_tensors: tuple[int, ...]  # one block
    head_tensors: tuple[int, ...]  # server side: final norm, project_out, output head

    def widths(self, length: int) -> dict[str, int]:
        """Per-token element counts of each activation unit at sequence length `length`."""
        return {
            "h": self.hidden,
            "q": self.heads * self.head_dim,
            "kv": self.kv_heads * self.head_dim,
            # K and V before repeat_kv copies them to every head (nothing extra when no GQA).
            "kvr": self.kv_heads * self.head_dim if self.kv_heads < self.heads else 0,
            "i": self.intermediate,
            "s": self.heads * length,
            "mask": length,
            "heads": self.heads,
            "hd": self.head_dim,
            "row": 1,
        }


# Llama family (Llama, SmolLM2, Mistral, Qwen2). Stored per block, float32: two RMSNorm outputs,
# two residual adds, rotate_half and embedded copies (q-width), repeat_kv'd K and V (q-width even
# with fewer KV heads), gate, up, SiLU and product (4 x i), softmax probabilities, two rstd rows.
LLAMA_EAGER = ActivationTable(
    layer_stored=(
        Term("h", n=6, n_up=1),
        Term("q", n=4),
        Term("i", n=4),
        Term("s", n=1, n_up=1),
        Term("row", n32=2),
    ),
    forward_work=(
        (Term("h", n=1), Term("q", n=3), Term("kvr", n=2), Term("s", n=2, n_up=1)),
        # The decoder layer keeps the attention probabilities alive through its MLP.
        (Term("h", n=2), Term("i", n=3), Term("s", n=1)),
    ),
    backward_work=((Term("s", n=1),), (Term("i", n=2),)),
    embedding_stored=(Term("h", n=1),),
    embedding_held=(Term("h", n=1),),
    embedding_held_graph=(),
    head_stored=(Term("h", n=2, n_up=1), Term("row", n32=1)),
    mask=(Term("mask", n=1), Term("hd", n=2)),
)

# OPT: pre-LayerNorm blocks with biases and ReLU (only the ReLU output is stored on the MLP side);
# LayerNorm keeps mean and rstd per token.
OPT_EAGER = ActivationTable(
    layer_stored=(Term("h", n=8), Term("i", n=1), Term("s", n=1, n_up=1), Term("row", n=4)),
    forward_work=(
        (Term("h", n=4), Term("s", n=2, n_up=1)),
        (Term("h", n=1), Term("i", n=2), Term("s", n=1)),
    ),
    backward_work=((Term("s", n=1),), (Term("i", n=2),)),
    embedding_stored=(Term("h", n=1),),
    embedding_held=(Term("h", n=1),),
    embedding_held_graph=(),
    head_stored=(Term("h", n=1), Term("row", n=2)),
)

# GPT-2: Conv1D projections and gelu_new written as Python ops, which stores five (B, L, I) tensors.
GPT2_EAGER = ActivationTable(
    layer_stored=(Term("h", n=8), Term("i", n=5), Term("s", n=1), Term("row", n=4)),
    forward_work=(
        (Term("h", n=4), Term("s", n=2)),
        (Term("h", n=2), Term("i", n=4), Term("s", n=1)),
    ),
    backward_work=((Term("s", n=1),), (Term("i", n=1),)),
    embedding_stored=(Term("h", n=1),),
    embedding_held=(Term("h", n=2),),
    embedding_held_graph=(Term("h", n=2),),
    head_stored=(Term("h", n=1), Term("row", n=2)),
)


# SDPA (torch.nn.functional.scaled_dot_product_attention; on CPU its flash kernel, on CUDA the
# flash or memory-efficient kernels): no (B, heads, L, L) tensor is stored or built, only the
# output and a float32 logsumexp per head and token; causal masking needs no mask tensor. Llama
# passes K and V at kv width (enable_gqa) instead of repeating them.
LLAMA_SDPA = ActivationTable(
    layer_stored=(
        Term("h", n=6, n_up=1),
        Term("q", n=2),
        Term("kv", n=2),
        Term("i", n=4),
        Term("heads", n32=1),
        Term("row", n32=2),
    ),
    forward_work=(
        (Term("h", n=2), Term("q", n=3), Term("kv", n=2)),
        (Term("h", n=2), Term("i", n=3)),
    ),
    backward_work=((Term("q", n=3),), (Term("i", n=2),)),
    embedding_stored=(Term("h", n=1),),
    embedding_held=(Term("h", n=1),),
    embedding_held_graph=(),
    head_stored=(Term("h", n=2, n_up=1), Term("row", n32=1)),
    mask=(Term("hd", n=2),),
    frozen_unsaved=(Term("i", n=1), Term("q", n=1), Term("h", n=1.875)),
)

OPT_SDPA = ActivationTable(
    layer_stored=(Term("h", n=8), Term("i", n=1), Term("heads", n32=1), Term("row", n=4)),
    forward_work=((Term("h", n=6),), (Term("h", n=1), Term("i", n=2))),
    backward_work=((Term("h", n=3),), (Term("i", n=2),)),
    embedding_stored=(Term("h", n=1),),
    embedding_held=(Term("h", n=1),),
    embedding_held_graph=(),
    head_stored=(Term("h", n=1), Term("row", n=2)),
    mask=(),
    frozen_unsaved=(Term("h", n=0.875),),
)

GPT2_SDPA = ActivationTable(
    layer_stored=(Term("h", n=10), Term("i", n=5), Term("heads", n32=1), Term("row", n=4)),
    forward_work=((Term("h", n=6),), (Term("h", n=2), Term("i", n=4))),
    backward_work=((Term("h", n=3),), (Term("i", n=1),)),
    embedding_stored=(Term("h", n=1),),
    embedding_held=(Term("h", n=2),),
    embedding_held_graph=(Term("h", n=2),),
    head_stored=(Term("h", n=1), Term("row", n=2)),
    mask=(),
)

ATTENTION_KERNELS = ("eager", "sdpa")

_TABLES: dict[tuple[str, str], ActivationTable] = {
    ("llama", "eager"): LLAMA_EAGER,
    ("llama", "sdpa"): LLAMA_SDPA,
    ("opt", "eager"): OPT_EAGER,
    ("opt", "sdpa"): OPT_SDPA,
    ("gpt2", "eager"): GPT2_EAGER,
    ("gpt2", "sdpa"): GPT2_SDPA,
}


def activation_table(family: str, attention: str = "eager") -> ActivationTable:
    """The activation counts of `family` ("llama", "opt", "gpt2") with an attention kernel."""
    table = _TABLES.get((family, attention))
    if table is None:
        kernels = ", ".join(ATTENTION_KERNELS)
        raise ConfigError(f"unknown attention kernel {attention!r}; choose one of: {kernels}")
    return table


def _llama_shapes(config: PretrainedConfig) -> ModelShapes:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    # Qwen2 has biases on q, k, v only; Llama-style configs say so with attention_bias/mlp_bias.
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    layer = [hidden * q_width, hidden * kv_width, hidden * kv_width, q_width * hidden]
    if qkv_bias:
        layer += [q_width, kv_width, kv_width]
    if o_bias:
        layer += [hidden]
    layer += [hidden * inter, hidden * inter, inter * hidden]
    if mlp_bias:
        layer += [inter, inter, hidden]
    layer += [hidden, hidden]  # input and post-attention RMSNorm weights
    vocab = config.vocab_size
    return ModelShapes(
        family="llama",
        n_layers=config.num_hidden_layers,
        hidden=hidden,
        intermediate=inter,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        embed_dim=hidden,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        embedding_tensors=(vocab * hidden,),
        layer_tensors=tuple(layer),
        head_tensors=(hidden, vocab * hidden),
    )


def _opt_shapes(config: PretrainedConfig) -> ModelShapes:
    hidden, inter, vocab = config.hidden_size, config.ffn_dim, config.vocab_size
    embed_dim = getattr(config, "word_embed_proj_dim", None) or hidden
    bias = bool(getattr(config, "enable_bias", True))
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    norm = [hidden, hidden] if affine else []
    proj = [hidden * hidden] + ([hidden] if bias else [])
    layer = proj * 4 + [hidden * inter] + ([inter] if bias else []) + [inter * hidden]
    layer += ([hidden] if bias else []) + norm * 2
    # OPT offsets learned positions by 2 (a padding artefact of the original checkpoints).
    embedding = [vocab * embed_dim, (config.max_position_embeddings + 2) * hidden]
    head: list[int] = []
    has_final_norm = getattr(config, "do_layer_norm_before", True) and not getattr(
        config, "_remove_final_layer_norm", False
    )
    if has_final_norm:
        head += norm
    if embed_dim != hidden:
        embedding.append(embed_dim * hidden)  # project_in
        head.append(hidden * embed_dim)  # project_out
    head.append(vocab * embed_dim)
    return ModelShapes(
        family="opt",
        n_layers=config.num_hidden_layers,
        hidden=hidden,
        intermediate=inter,
        heads=config.num_attention_heads,
        kv_heads=config.num_attention_heads,
        head_dim=hidden // config.num_attention_heads,
        vocab=vocab,
        embed_dim=embed_dim,
        tied=bool(getattr(config, "tie_word_embeddings", True)),
        embedding_tensors=tuple(embedding),
        layer_tensors=tuple(layer),
        head_tensors=tuple(head),
    )


def _gpt2_shapes(config: PretrainedConfig) -> ModelShapes:
    hidden, vocab = config.n_embd, config.vocab_size
    inter = getattr(config, "n_inner", None) or 4 * hidden
    layer = [hidden * 3 * hidden, 3 * hidden, hidden * hidden, hidden]  # c_attn, attn c_proj
    layer += [hidden * inter, inter, inter * hidden, hidden]  # c_fc, mlp c_proj
    layer += [hidden, hidden, hidden, hidden]  # ln_1, ln_2
    return ModelShapes(
        family="gpt2",
        n_layers=config.n_layer,
        hidden=hidden,
        intermediate=inter,
        heads=config.n_head,
        kv_heads=config.n_head,
        head_dim=hidden // config.n_head,
        vocab=vocab,
        embed_dim=hidden,
        tied=bool(getattr(config, "tie_word_embeddings", True)),
        embedding_tensors=(vocab * hidden, config.n_positions * hidden),
        layer_tensors=tuple(layer),
        head_tensors=(hidden, hidden, vocab * hidden),
    )


SHAPE_FUNCTIONS: dict[str, Callable[[PretrainedConfig], ModelShapes]] = {
    "llama": _llama_shapes,
    "mistral": _llama_shapes,
    "qwen2": _llama_shapes,
    "opt": _opt_shapes,
    "gpt2": _gpt2_shapes,
}


def model_shapes(config: PretrainedConfig) -> ModelShapes:
    """Shapes of a supported model from its config, keyed by `config.model_type`."""
    model_type = getattr(config, "model_type", None)
    shape_function = SHAPE_FUNCTIONS.get(model_type)
    if shape_function is None:
        supported = ", ".join(sorted(SHAPE_FUNCTIONS))
        raise ConfigError(
            f"no memory model for model_type {model_type!r}; supported types: {supported}"
        )
    return shape_function(config)
