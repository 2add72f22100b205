"""Qwen2.5-VL backbone + value head: the Skywork-VL-Reward model (arXiv 2505.07263).

The score of a conversation is ``summary(dropout(h))`` where ``h`` is the last decoder layer's
hidden state *after the final norm*, taken at the last real token (found from the attention mask,
so left, right and no padding give the same score). The LM head is kept in the checkpoint but not
run.

Checkpoint layout (the published Skywork-VL-Reward-7B's): the backbone saved with
``save_pretrained`` plus ``value_head.safetensors`` holding ``v_head.summary.weight`` ([1, hidden])
and ``v_head.summary.bias`` ([1]). trl's ``AutoModelForCausalLMWithValueHead``, which the published
snippet uses, is gone from trl, so the head lives here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mpo.models import VALUE_HEAD_FILE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ValueHead(nn.Module):
    """Dropout then ``Linear(hidden, 1)``; the parameter names match the Skywork checkpoint."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(hidden))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row: [B, T] -> [B]."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=-1)


class RewardModel(nn.Module):
    """A scalar reward model over (conversation, response) token sequences."""

    def __init__(self, backbone: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone  # Qwen2_5_VLForConditionalGeneration
        hidden = backbone.config.text_config.hidden_size
        self.v_head = ValueHead(hidden, dropout).to(dtype=backbone.dtype, device=backbone.device)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **vision,
    ) -> torch.Tensor:
        """Scores, one per row: [B]."""
        if image_grid_thw is not None and "mm_token_type_ids" not in vision:
            from mpo.chat import multimodal_token_types

            config = self.config
            vision["mm_token_type_ids"] = multimodal_token_types(
                input_ids, config.image_token_id, config.video_token_id, attention_mask
            )
        outputs = self.backbone.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=False,
            **vision,
        )
        hidden = outputs.last_hidden_state  # [B, T, H], after the final norm
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return self.v_head(last).squeeze(-1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
        dropout: float = 0.1,
    ) -> RewardModel:
        """Load a Skywork-layout folder (backbone + ``value_head.safetensors``)."""
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLForConditionalGeneration

        from mpo.models import check_model_folder

        path = Path(path)
        check_model_folder(path, "reward model", reward=True, processor=False)  # the weights alone load here
        head_file = path / VALUE_HEAD_FILE
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, use_safetensors=True
        )
        if device is not None:
            backbone = backbone.to(device)
        model = cls(backbone, dropout)
        state = load_file(str(head_file))
        model.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in state.items()})
        return model.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Save in the Skywork layout: backbone folder + ``value_head.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.backbone.save_pretrained(path)
        head = {f"v_head.{k}": v.detach().contiguous().cpu() for k, v in self.v_head.state_dict().items()}
        save_file(head, str(path / VALUE_HEAD_FILE), metadata={"format": "pt"})
        return path
