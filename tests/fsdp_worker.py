"""Run by test_train.py under torchrun (2 CPU processes, gloo): the trainer's Distiller sharded
with torch's FSDP2 (`fully_shard`, as Accelerate's FSDP v2 plugin applies it), one micro-batch
per rank normalised as train._step does, the head's gradient computed in the forward pass;
writes the gathered gradients, the eval metrics (`unsharded`) and the full state dict for the
test to compare with an unsharded run."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from softlabels.train_student.batches import collate
from softlabels.train_student.evaluate import evaluate
from softlabels.train_student.train import Distiller, unsharded
from tests.fsdp_reference import build, micro_batches


def main(data: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, cfg, recipe = build(data)
    distiller = Distiller(model, [recipe], cfg.chunk)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(distiller)
    chunks = micro_batches(data, world)
    kd_n = sum(int(r.target_mask.sum()) for c in chunks for r in c)
    # the loss's coefficients given: the head's gradient is computed in the forward pass (the
    # test's unsharded reference recomputes it in the backward pass)
    coef = torch.tensor([[1.0 / kd_n], [0.0]])
    sums = distiller(collate(chunks[rank], model.config.vocab_size), coef)
    ((coef * sums).sum() * world).backward()  # FSDP averages gradients over ranks, as DDP does
    grads = {n: p.grad.full_tensor() for n, p in distiller.named_parameters()}
    with torch.no_grad(), unsharded(distiller):
        metrics = evaluate(model, data, 1024, chunk=cfg.chunk)
    state = get_model_state_dict(distiller, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    if rank == 0:
        torch.save({"grads": grads, "metrics": metrics, "state": state}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    import os

    main(sys.argv[1], sys.argv[2])
    # as softlabels.cli.run leaves: Arrow's thread pool can abort the interpreter's teardown
    # ("terminate called without an active exception", apache/arrow#34314; 1 run in 6 here)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
