"""Length-aware batching of preference pairs: a length-grouped sampler and the run's padding figure.

A micro-batch is padded to its longest row, so pairs of very different lengths in one micro-batch
waste compute on padding. :class:`LengthGroupedPairSampler` (the Trainer's train sampler) orders an
epoch so that each micro-batch holds pairs of similar length, while optimizer steps stay random:

1. the pairs are shuffled (seeded by ``seed + epoch``, so a resumed run sees the same order);
2. cut into mega-batches of ``group`` global batches, each sorted by length;
3. each sorted mega-batch is cut into global batches (``per_device x accumulation x world`` pairs, one
   optimizer step), and the global batches are shuffled, the last, possibly short, one kept last.

A global batch is a contiguous run of the sorted order, so every micro-batch carved from it (by the
data loader and, under DDP, across ranks) holds neighbours in length; and the pairs of an optimizer
step do not depend on how it is split into micro-batches, ranks or accumulation (1 x 8 and 4 x 2
train on the same pairs). Unlike transformers' ``LengthGroupedSampler`` (which takes
``batch x accumulation`` per process and leaves each mega-batch in descending length), steps do not
walk from long to short pairs.

A pair's length is ``P + C + R`` (prompt, chosen, rejected tokens): its packed row under the shared
forward (:mod:`mpo.train.shared_prefix`), and what orders ``P + max(C, R)``, the unshared rows, nearly as
well. One key for both layouts keeps ``train.share_prompt`` a pure speed switch: on or off, the same
pairs train together. :func:`padding_summary` turns the trainer's token and slot counts into the
``padding`` entry of ``data_report.json``.
"""

from __future__ import annotations

import torch

DEFAULT_GROUP = 32  # global batches per sorted mega-batch


def pair_lengths(dataset) -> list[int]:
    """``P + C + R`` of each pair of a :class:`mpo.train.collate.PairDataset` (its packed row length)."""
    return [p.prompt_len + p.chosen_len + p.rejected_len for p in dataset.plans]


class LengthGroupedPairSampler(torch.utils.data.Sampler):
    """Indices of one epoch, grouped by length into global batches (see the module docstring)."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int = 0, group: int = DEFAULT_GROUP):
        if global_batch < 1 or group < 1:
            raise ValueError("global_batch and group must be >= 1")
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.global_batch * self.group
        batches = []
        for start in range(0, len(shuffled), size):
            mega = sorted(shuffled[start : start + size], key=lambda i: self.lengths[i])
            batches += [mega[i : i + self.global_batch] for i in range(0, len(mega), self.global_batch)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.global_batch else []
        picks = torch.randperm(len(batches), generator=generator).tolist()
        return [i for batch in [batches[p] for p in picks] + tail for i in batch]

    def __iter__(self):
        return iter(self.order())


def padded_fraction(lengths: list[int], order: list[int], micro_batch: int) -> float:
    """Padding share of micro-batches of ``micro_batch`` consecutive items of ``order`` (each padded
    to its longest item)."""
    tokens = slots = 0
    for start in range(0, len(order), micro_batch):
        chunk = [lengths[i] for i in order[start : start + micro_batch]]
        tokens += sum(chunk)
        slots += len(chunk) * max(chunk)
    return 1.0 - tokens / slots if slots else 0.0


def padding_summary(counts: torch.Tensor, pair_forward, grouped: bool) -> dict:
    """The ``padding`` entry of ``data_report.json`` from the summed ``[tokens, slots, micro-batches]``
    of the training micro-batches this process ran (summed over ranks when distributed)."""
    counts = counts.detach().to(torch.float64).clone()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(_collective_device())
        dist.all_reduce(counts)
    tokens, slots, micro_batches = (float(x) for x in counts.tolist())
    return {
        "layout": "shared" if pair_forward.shared else "unshared",
        "pair_forward": pair_forward.describe(),
        "group_by_length": grouped,
        "micro_batches": int(micro_batches),
        "tokens": int(tokens),
        "slots": int(slots),
        "padding_fraction": 1.0 - tokens / slots if slots else 0.0,
    }


def _collective_device():
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
