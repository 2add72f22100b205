"""What every rollout engine provides (the interface :mod:`mpo.rollout.hf` and :mod:`mpo.rollout.vllm`
implement), the error they raise and the label a rollout records for its policy; and the seeds that
make sampling reproducible whatever the batching (:func:`chunk_seed`, :func:`seeded`)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

from mpo.errors import MpoError
from mpo.records import Prompt, Rollout

if TYPE_CHECKING:
    from mpo.config import ModelConfig, RolloutConfig


class RolloutError(MpoError):
    """A rollout request that cannot be served (bad policy folder, too many images, bad count)."""


def chunk_seed(base_seed: int, *keys: object) -> int:
    """A stable 31-bit seed from a base seed and any keys (round, chunk index, a GRPO step and row, ...)."""
    digest = hashlib.sha256(repr((base_seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def seeded(seed: int, device: str = "cpu") -> Iterator[None]:
    """torch's generators seeded with ``seed`` inside the block, and the CPU's and (``device`` a CUDA
    one) the current CUDA device's restored after it: the caller's random stream is where it was."""
    import torch

    devices = [torch.cuda.current_device()] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def policy_label(policy_dir: str | Path) -> str:
    """The label written into ``Rollout.policy``: the folder name, with its parent when the name is
    the generic ``policy`` (``round_002/policy``)."""
    path = Path(policy_dir)
    return f"{path.parent.name}/{path.name}" if path.name == "policy" and path.parent.name else path.name


def check_policy_dir(policy_dir: str | Path) -> Path:
    """A policy folder (or Hub id) checked as a model folder: one line naming what is wrong."""
    from mpo.models import model_folder

    return model_folder(policy_dir, "policy")


class Backend:
    """What every rollout engine provides. Use as a context manager to ``close`` on exit."""

    name = "base"

    def __init__(self, rollout_config: RolloutConfig, model_config: ModelConfig, policy_dir: str | Path):
        self.config = rollout_config
        self.model_config = model_config
        self.policy_dir = check_policy_dir(policy_dir)
        self.policy = policy_label(self.policy_dir)

    def generate(self, prompts: Sequence[Prompt], num_samples: int | None = None, seed: int | None = None
                 ) -> list[Rollout]:
        """``num_samples`` rollouts per prompt (default ``rollout.num_samples``), prompt order kept,
        ``sample_idx`` 0..n-1 within a prompt; ``seed`` defaults to ``rollout.seed``."""
        raise NotImplementedError

    def refresh(self, policy_dir: str | Path) -> None:
        """Roll out from the checkpoint in ``policy_dir`` from now on; the folder already being
        served is not loaded again."""
        path = check_policy_dir(policy_dir)
        if self.closed:
            raise RolloutError("backend is closed")
        if path.resolve() != self.policy_dir.resolve():
            self._refresh(path)
        self.policy_dir, self.policy = path, policy_label(path)

    def _refresh(self, policy_dir: Path) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def sleep(self) -> None:
        """Give the accelerator's memory back while other stages run (:meth:`wake` before sampling);
        a no-op where there is nothing to give back (the CPU)."""

    def wake(self) -> None:
        """Undo :meth:`sleep`."""

    def close(self) -> None:
        """Free the engine; the backend cannot generate afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resolve(self, num_samples: int | None, seed: int | None) -> tuple[int, int]:
        n = self.config.num_samples if num_samples is None else int(num_samples)
        if n < 1:
            raise RolloutError(f"num_samples must be >= 1, got {n}")
        return n, self.config.seed if seed is None else int(seed)
