"""Phase-by-phase peak model of one party's step, from the bytes its part of the model holds.

`hosl.memory.analytic` turns a config and a batch into a `PartPlan` (bytes only, no shapes);
`party_phases` decides, for the party's role, which of those bytes are live together in each
phase of a step and returns the components and the phase peaks (resident bytes included).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def has_embedding(self) -> bool:
        return bool(self.embedding_params)

    @property
    def has_head(self) -> bool:
        return bool(self.head_params) or self.tied_in_party

    @property
    def parameters(self) -> int:
        return (
            sum(self.embedding_params)
            + self.layers * sum(self.layer_params)
            + sum(self.head_params)
        )

    @property
    def largest_tensor(self) -> int:
        tensors = self.embedding_params + self.head_params
        if self.layers:
            tensors = tensors + self.layer_params
        return max(tensors, default=0)

    @property
    def largest_noise(self) -> int:
        """The most ZO noise alive at once: one whole tensor's z, or the embedding's rows.

        Noise is float32 whatever the parameters' dtype (and so is a perturbed bf16 tensor)."""
        whole = self.embedding_params[1:] if self.row_wise_embedding else self.embedding_params
        whole = whole + self.head_params + (self.layer_params if self.layers else [])
        return max([*(t * 4 // self.param_bytes for t in whole), self.row_noise])

    @property
    def stored(self) -> int:
        return self.embedding_stored + self.layers * self.layer_stored + self.head_stored


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
    below_last = plan.embedding_stored + max(plan.layers - 1, 0) * plan.layer_stored
    held = plan.embedding_held_graph + plan.mask
    candidates = [plan.stored + plan.scores]
    if plan.layers:
        candidates.append(below_last + held + plan.layer_work + plan.hidden)
        candidates.append(plan.stored - plan.head_stored + held)
    return max(candidates)


def _backward_extra(plan: PartPlan) -> int:
    """Walk backward from the head to the embedding, tracking activations freed and gradients
    made; return the largest working bytes (gradients included) seen on the way."""
    layer_grads = sum(plan.layer_params)
    live = plan.stored + plan.scores
    peak = live
    if plan.has_head:
        head_grads = sum(plan.head_params)
        if plan.tied_in_party:
            head_grads += plan.embedding_vocab_bytes
        # The gradients of the log-softmax and then of the logits are made next to the saved
        # ones; the head's gradient comes after the first of them is freed.
        peak = max(peak, live + max(plan.score_grads, plan.score_grads // 2 + head_grads))
        live += head_grads - plan.scores - plan.head_stored
    for _ in range(plan.layers):
        peak = max(peak, live + layer_grads + plan.layer_backward_work)
        live += layer_grads - plan.layer_stored
    if plan.has_embedding:
        embedding_grads = sum(plan.embedding_params)
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
    params = plan.parameters
    fo = role == "fo"
    widen = 4 // plan.param_bytes  # a float32 copy of a parameter, in units of its storage
    masters = fo and widen > 1
    state = (1 + state_per_param) * widen * params if masters else state_per_param * params
    components = {
        "parameters": params,
        "gradients": params if fo else 0,
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
        phases["update"] = resident + plan.boundary + widen * (params + step_temporary)
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
