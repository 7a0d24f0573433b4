"""In-batch losses see the global batch: 2 workers x 8 triplets take the same step as 1 worker x 16.

The step is sr-ray's own ``train_step`` over a real 2-process gloo group with the model in DDP (what Ray Train's
``prepare_model`` gives each worker when there are several), once per loss, from the same seeded tiny CLIP. The optimizer is plain SGD so the updated weights follow the gradient's
size (Adam's first step would hide a gradient off by a constant factor). The batch has a prompt whose
triplets sit on both workers (InfoNCE must mask them across workers) and a bad row.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from sr_ray.reward.losses import LOSSES, LossConfig
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip, freeze
from sr_ray.reward.train import train_step

ROWS = 16
PROMPTS = [0, 1, 1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 11, 12, 12]  # prompt 6 spans rows 7-8: one on each worker
BAD_ROW = 11


def _batch():
    g = torch.Generator().manual_seed(7)
    prompt_tokens = torch.randint(1, 49000, (max(PROMPTS) + 1, 16), generator=g)
    tokens = prompt_tokens[torch.tensor(PROMPTS)]
    pos = torch.rand(ROWS, 3, 32, 32, generator=g)
    neg = torch.rand(ROWS, 3, 32, 32, generator=g)
    valid = torch.ones(ROWS, dtype=torch.bool)
    valid[BAD_ROW] = False
    return tokens, pos, neg, torch.tensor(PROMPTS), valid


def _fresh_model():
    torch.manual_seed(3)
    model = RewardModel(build_clip(ModelConfig(name="sr-tiny")))
    freeze(model.clip, unfreeze_vision_blocks=1, unfreeze_text_blocks=1)
    return model


def _one_step_per_loss(rank: int, world: int, wrap=lambda m: m) -> dict:
    """{loss: (loss value, trainable weights after one SGD step)} on this worker's rows of the batch."""
    per = ROWS // world
    rows = [x[rank * per:(rank + 1) * per] for x in _batch()]
    out = {}
    for name in LOSSES:
        core = _fresh_model()
        params = [p for p in core.parameters() if p.requires_grad]
        optim = torch.optim.SGD(params, lr=0.5)
        loss = train_step(wrap(core), rows, LossConfig(name), optim, params, 0.0, contextlib.nullcontext)
        out[name] = (loss, {k: v.detach().clone() for k, v in core.named_parameters() if v.requires_grad})
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        torch.save(_one_step_per_loss(rank, world, DistributedDataParallel), f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_workers_take_the_same_step_as_one(tmp_path):
    from conftest import free_port

    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    whole = _one_step_per_loss(0, 1)
    before = {k: v.detach() for k, v in _fresh_model().named_parameters() if v.requires_grad}
    for rank in (0, 1):
        split = torch.load(tmp_path / f"rank{rank}.pt")
        for name in LOSSES:
            (loss1, w1), (loss2, w2) = whole[name], split[name]
            assert loss2 == pytest.approx(loss1, abs=1e-5), (name, rank)
            assert w1.keys() == w2.keys()
            moved = max(float((w1[k] - before[k]).abs().max()) for k in w1)
            assert moved > 1e-3, f"{name}: the step changed nothing, so the comparison would prove nothing"
            for k in w1:
                torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=f"{name} {k} rank {rank}")
