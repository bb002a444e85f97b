"""The server's part, data-parallel: one replica of θ_s per rank, gradients averaged by DDP.

The first step of a server that grows past one machine (docs/scale_out.md). When many clients
stream activations to the server, one server step can take several clients' (or micro-batches')
activations at once: each rank of a `torch.distributed` group holds a replica of the server part
and its optimizer, runs forward and backward on the activations that reached it, and
`DistributedDataParallel` all-reduces the parameter gradients during the backward, so every
replica takes the same optimizer step and θ_s stays identical across ranks.

The loss is the mean over the step's examples, whichever rank holds them. DDP averages gradients
over the W ranks, so rank r, holding B_r of the step's B examples, scales its own mean loss by
W · B_r / B: (1/W) Σ_r W · (B_r/B) · ∇mean_r = Σ_r (B_r/B) · ∇mean_r = ∇(global mean). The
gradient returned to a client is ∂(global mean)/∂h of its own rows: the rank's input gradient
divided by W (DDP leaves input gradients alone). With equal shards the scale is 1; with unequal
ones, plain DDP would weight a small shard's examples more than a large one's.

Works on CPU (gloo) and GPU (nccl) alike; the process group is the caller's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hosl.batching import ScoreSpec
from hosl.models.split import Activations, ServerPart
from hosl.protocol import CutBatch
from hosl.scoring import candidate_scores, classification_loss


class ScoredServer(nn.Module):
    """The server part and its scoring as one module, so that the head (used after the
    part's `forward`) runs inside DDP's forward like every other server parameter."""

    def __init__(self, part: ServerPart) -> None:
        super().__init__()
        self.part = part

    def forward(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor,
                spec: ScoreSpec) -> Tensor:
        final = self.part(Activations(hidden, attention_mask, position_ids))  # (S, L, H)
        return candidate_scores(final, self.part.head, spec)  # (B, C)


class DataParallelServer:
    """One rank's replica of the server part and its optimizer, synchronised by DDP."""

    def __init__(self, part: ServerPart, optimizer: torch.optim.Optimizer,
                 group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        # DDP broadcasts rank 0's parameters here, so every replica starts from the same θ_s
        self.model = DistributedDataParallel(ScoredServer(part.train(False)), process_group=group)
        self.optimizer = optimizer

    def loss_scale(self, local_examples: int) -> float:
        """W · B_r / B: what makes DDP's gradient average the gradient of the step's mean loss
        (B summed over the ranks: one all-reduce of a single number)."""
        total = torch.tensor([local_examples], dtype=torch.int64)
        dist.all_reduce(total, group=self.group)
        return self.world * local_examples / int(total.item())

    def fo_step(self, hidden: Tensor, batch: CutBatch) -> tuple[float, Tensor]:
        """One FO server step on this rank's (S_r, L, H) activations; every rank calls it for
        the same step. Returns this rank's mean loss and ∂(the step's mean loss)/∂h of its rows
        (what the client backpropagates, as in `hosl.parties.server.ServerParty.fo_step`)."""
        scale = self.loss_scale(batch.spec.num_examples)
        # an inference tensor (an in-process client's output) cannot require grad: copy it
        hidden = (hidden.clone() if hidden.is_inference() else hidden.detach()).requires_grad_()
        scores = self.model(hidden, batch.attention_mask, batch.position_ids, batch.spec)
        loss = classification_loss(scores, batch.spec.labels)
        (loss * scale).backward()  # DDP all-reduces (averages) the parameter gradients here
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert hidden.grad is not None
        return loss.item(), hidden.grad / self.world
