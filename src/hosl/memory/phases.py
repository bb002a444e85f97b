"""Phase-by-phase peak model of one party's step, from the bytes its part of the model holds.

`hosl.memory.analytic` turns a config and a batch into a `PartPlan` (bytes only, no shapes);
`party_phases` decides, for the party's role, which of those bytes are live together in each
phase of a step and returns the components and the phase peaks (resident bytes included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hosl.zo.engine import LOW_PRECISION_CHUNK_ELEMENTS, LOW_PRECISION_UPDATE_COPIES


@dataclass(frozen=True)
class PartPlan:
    """Bytes of one party's part of the model at one batch shape and dtype."""

    layers: int  # decoder blocks this party owns
    act_bytes: int  # bytes per activation element (float32 for a ZO party whatever its storage)
    embedding_params: list[int]  # bytes per tensor; empty when the party has no input side
    layer_params: list[int]  # bytes per tensor of one block
    head_params: list[int]  # bytes per tensor; empty when the party has no output side
    tied_in_party: bool  # the head is the embedding's own storage (unsplit tied models)
    embedding_vocab_bytes: int  # one (V, E) tensor: a tied embedding's gradient is summed into it
    hidden: int  # one (B, L, H) tensor
    layer_stored: int
    layer_work: int
    layer_backward_work: int
    embedding_stored: int
    embedding_held: int  # kept alive by the input side until the last block ran (no graph)
    embedding_held_graph: int  # the same beyond embedding_stored, with a graph
    head_stored: int
    mask: int  # the attention mask, alive while blocks run
    scores: int  # logits + log-softmax at the scored positions (or all, for full logits)
    score_grads: int  # their float32 gradients in backward: of the log-softmax, of the logits
    boundary_forward: int  # activations crossing the cut held while the party runs a forward
    boundary: int  # ... held during the rest of its step (backward, update, evaluation)
    # The token embedding's ZO noise is drawn row by row (hosl.zo.engine) unless a head in the
    # same party uses the whole matrix: then only the looked-up rows (forward) or one chunk of
    # rows (update) exist at a time, never a (V, E) noise tensor.
    row_wise_embedding: bool = False
    row_noise: int = 0  # the larger of those two, in bytes
    param_bytes: int = 4  # bytes per parameter element as stored (2 for bf16)
    # LoRA (hosl.memory.adapters): bytes per adapter tensor of one block, and how much one
    # block's stored activations change with them (their own, less what the frozen base no
    # longer keeps: may be negative); with adapters only they train (`frozen_base`).
    adapter_params: list[int] = field(default_factory=list)
    adapter_stored: int = 0
    # Activation checkpointing (per block, non-reentrant): a block keeps only its input for the
    # backward, which recomputes the rest one block at a time.
    checkpointing: bool = False
    # Fused backward-and-update (hosl.fused_sgd): each gradient is applied and freed as soon as
    # it is made; the embeddings' gradients are sparse, `sparse_embedding_grads` bytes.
    fused: bool = False
    sparse_embedding_grads: int = 0

    @property
    def has_embedding(self) -> bool:
        return bool(self.embedding_params)

    @property
    def has_head(self) -> bool:
        return bool(self.head_params) or self.tied_in_party

    @property
    def frozen_base(self) -> bool:
        return bool(self.adapter_params)

    @property
    def parameters(self) -> int:
        return (
            sum(self.embedding_params)
            + self.layers * (sum(self.layer_params) + sum(self.adapter_params))
            + sum(self.head_params)
        )

    @property
    def trainable(self) -> int:
        """Bytes of the parameters that get gradients and optimizer state."""
        return self.layers * sum(self.adapter_params) if self.frozen_base else self.parameters

    @property
    def largest_tensor(self) -> int:
        """The largest trainable tensor (the optimizer step's temporaries are its size)."""
        if self.frozen_base:
            return max(self.adapter_params) if self.layers else 0
        tensors = self.embedding_params + self.head_params
        if self.layers:
            tensors = tensors + self.layer_params
        return max(tensors, default=0)

    @property
    def largest_noise(self) -> int:
        """The most ZO noise alive at once: one whole tensor's z, or the embedding's rows.

        Noise is float32 whatever the parameters' dtype (and so is a perturbed bf16 tensor).
        With adapters only they are perturbed (float32 already)."""
        if self.frozen_base:
            return self.largest_tensor
        whole = self.embedding_params[1:] if self.row_wise_embedding else self.embedding_params
        whole = whole + self.head_params + (self.layer_params if self.layers else [])
        return max([*(t * 4 // self.param_bytes for t in whole), self.row_noise])

    @property
    def block_stored(self) -> int:
        """What one block stores for its backward (recomputed there under checkpointing)."""
        return self.layer_stored + self.adapter_stored

    @property
    def checkpointed_inputs(self) -> int:
        """Block inputs a checkpointed part keeps beyond the embedding's and the head's own:
        the first block's input is the embedding output (stored) or the received boundary,
        the last block's output is stored by the head, or is what a client sends on."""
        if not self.layers:
            return 0
        return (self.layers - (1 if self.has_head else 0)) * self.hidden

    @property
    def stored(self) -> int:
        blocks = self.checkpointed_inputs if self.checkpointing else self.layers * self.block_stored
        return self.embedding_stored + blocks + self.head_stored


def _block_stream(plan: PartPlan) -> int:
    """The residual stream entering a block beyond what the party already holds: the first
    block's input is the embedding output (held) or a received activation (boundary), so only
    parties with two or more blocks hold a separate one at their peak."""
    return plan.hidden if plan.layers >= 2 else 0


def _forward_only_extra(plan: PartPlan) -> int:
    """Working bytes of a forward pass without a graph: the larger of one block's working set
    (with the residual stream entering it, what the input side keeps alive and the mask) and the
    output side's (the last block's output, final norm outputs and scores)."""
    candidates = [
        _block_stream(plan) + plan.embedding_held + plan.mask
        + (plan.layer_work if plan.layers else 0)
    ]
    if plan.has_head:
        candidates.append(plan.hidden + plan.head_stored + plan.scores)
    return max(candidates)


def _transient(plan: PartPlan) -> int:
    """The largest forward working set apart from the scores: one block's (with the residual
    stream entering it, the input side's held tensors and the mask) or the final norm's (with
    the last block's output)."""
    block = _block_stream(plan) + plan.embedding_held + plan.mask
    block += plan.layer_work if plan.layers else 0
    return max(block, plan.hidden + plan.head_stored)


def _forward_with_graph_extra(plan: PartPlan) -> int:
    """Working bytes at the top of a forward pass that records a graph."""
    held = plan.embedding_held_graph + plan.mask
    candidates = [plan.stored + plan.scores]
    if plan.checkpointing and plan.layers:
        # each block runs as a forward without a graph, keeping only its input
        below = plan.embedding_stored + plan.checkpointed_inputs
        candidates.append(below + held + plan.layer_work + plan.hidden)
    elif plan.layers:
        below_last = plan.embedding_stored + max(plan.layers - 1, 0) * plan.block_stored
        candidates.append(below_last + held + plan.layer_work + plan.hidden)
        candidates.append(plan.stored - plan.head_stored + held)
    return max(candidates)


def _backward_extra(plan: PartPlan) -> int:
    """Walk backward from the head to the embedding, tracking activations freed and gradients
    made; return the largest working bytes (gradients included) seen on the way."""
    # one block's new gradients; a fused update applies and frees each as soon as it is made
    layer_tensors = plan.adapter_params if plan.frozen_base else plan.layer_params
    layer_grads = max(layer_tensors) if plan.fused else sum(layer_tensors)
    kept_grads = 0 if plan.fused else layer_grads
    live = plan.stored + plan.scores
    peak = live
    if plan.has_head:
        head_grads = 0 if plan.frozen_base or plan.fused else sum(plan.head_params)
        if plan.tied_in_party and not plan.frozen_base:
            head_grads += plan.embedding_vocab_bytes
        # The gradients of the log-softmax and then of the logits are made next to the saved
        # ones; the head's gradient comes after the first of them is freed.
        peak = max(peak, live + max(plan.score_grads, plan.score_grads // 2 + head_grads))
        live += head_grads - plan.scores - plan.head_stored
    for _ in range(plan.layers):
        if plan.checkpointing:
            # the block's forward is recomputed with a graph, then walked back; its input
            # (the block below's output) is freed after it
            peak = max(peak, live + plan.block_stored + layer_grads + plan.layer_backward_work)
            live += kept_grads - plan.hidden
        else:
            peak = max(peak, live + layer_grads + plan.layer_backward_work)
            live += kept_grads - plan.block_stored
    if plan.has_embedding and not plan.frozen_base:
        embedding_grads = plan.sparse_embedding_grads if plan.fused else sum(
            plan.embedding_params)
        if plan.tied_in_party:
            # The head's gradient already holds the (V, E) slot; the embedding's is made apart
            # and then summed into it, so two more (V, E) tensors are live for a moment.
            peak = max(peak, live + embedding_grads + plan.embedding_vocab_bytes)
        else:
            peak = max(peak, live + embedding_grads)
    return peak


def party_phases(
    plan: PartPlan, role: str, state_per_param: int, *, evaluates: bool = False
) -> tuple[dict[str, int], dict[str, int]]:
    """Components and phase peaks of a party with `role` in {"fo", "zo", "inference"}.

    `state_per_param` is the optimizer's state tensors per parameter (FO roles only);
    `evaluates` adds the forward-only evaluation phase of the HOSL server. Parameters stored
    below float32 (bf16) mean float32 master weights and state for an FO role
    (`hosl.master_weights`), and float32 compute on use for a ZO role (`hosl.zo.engine`).
    """
    params, trainable = plan.parameters, plan.trainable
    fo = role == "fo"
    widen = 4 // plan.param_bytes  # a float32 copy of a parameter, in units of its storage
    if plan.frozen_base:
        widen = 1  # adapters are float32 already
    masters = fo and widen > 1
    state = (1 + state_per_param) * widen * trainable if masters else state_per_param * trainable
    # a fused update never holds more than the gradient the backward is working on
    fused_grads = max(
        max(plan.adapter_params) if plan.frozen_base else max(plan.layer_params),
        plan.sparse_embedding_grads,
    )
    components = {
        "parameters": params,
        "gradients": (fused_grads if plan.fused else trainable) if fo else 0,
        "optimizer_state": state if fo else 0,
        "stored_activations": plan.stored if fo else 0,
        "transient": _transient(plan),
        "perturbation": plan.largest_noise if role == "zo" else 0,
        "boundary": max(plan.boundary, plan.boundary_forward),
        "scores": plan.scores,
    }
    resident = params + components["optimizer_state"]
    phases: dict[str, int] = {}
    if fo:
        phases["forward"] = resident + plan.boundary_forward + _forward_with_graph_extra(plan)
        phases["backward"] = resident + plan.boundary + _backward_extra(plan)
        # PyTorch's single-tensor AdamW builds its denominator sqrt(v) / c + eps out of place:
        # two temporaries of the tensor being updated are live for a moment.
        step_temporary = 2 * plan.largest_tensor if state_per_param == 2 else 0
        # with master weights the step holds the gradients' float32 copies instead
        if not plan.fused:  # a fused update happens inside the backward
            phases["update"] = resident + plan.boundary + widen * (trainable + step_temporary)
        if evaluates:
            phases["eval"] = resident + plan.boundary + _forward_only_extra(plan)
    else:
        # (a bf16 ZO party's float32 copy of one module's parameters is gone before that
        # module's activations peak: measured, it adds nothing to the phase)
        phases["forward"] = resident + plan.boundary_forward + _forward_only_extra(plan)
        if role == "zo":
            # One perturbed or noise tensor at a time (the embedding's: rows of it). A bf16
            # update holds a few float32 copies of the chunk of rows it works on (measured).
            noise = plan.largest_noise
            if widen > 1:
                chunk = min(noise, 4 * LOW_PRECISION_CHUNK_ELEMENTS)
                noise = max(noise, LOW_PRECISION_UPDATE_COPIES * chunk)
            phases["perturb"] = resident + plan.boundary + noise
    return components, phases
