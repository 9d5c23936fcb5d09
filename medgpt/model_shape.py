"""The shape of a GPT-2 model: the GPT2Config numbers its parameter tensors depend on, and the
parameter counts derived from them. One type for the memory planner, the FLOP counter and the
checkpoint check ("same model?"). Pure arithmetic, no torch: launcher/plan.py's --help stays light."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelShape:
    """Named as in GPT2Config, so a difference reads as the config field to change."""
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    # As the config has it: None (4 * n_embd) and 4 * n_embd differ here, as they do in config.json,
    # and a changed n_embd is one difference, not two.
    n_inner: int | None
    tie_word_embeddings: bool = True  # lm_head shares wte's weight (GPT-2 does)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelShape:
        """Also a checkpoint meta's "model_shape" as earlier medgpt wrote it: without
        tie_word_embeddings, which every GPT-2 config it ran had true."""
        return cls(**{"tie_word_embeddings": True, **values})

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def differences(self, other: ModelShape) -> list[tuple[str, Any, Any]]:
        """(field, self's value, other's value) for every field that differs."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name))
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @property
    def layer_params(self) -> int:
        """One GPT2Block: two LayerNorms, c_attn (h -> 3h), attention c_proj, c_fc (h -> inner), MLP c_proj."""
        h, f = self.n_embd, self.mlp_width
        return 2 * (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)

    @property
    def body_params(self) -> int:
        """The blocks and the final LayerNorm: everything but the token and position embeddings and
        the LM head (an embedding lookup costs no FLOPs; the FLOP count takes the head apart)."""
        return self.n_layer * self.layer_params + 2 * self.n_embd

    @property
    def num_params(self) -> int:
        embeddings = (self.vocab_size + self.n_positions) * self.n_embd
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.n_embd
        return embeddings + self.body_params + head

    @property
    def largest_layer_params(self) -> int:
        """The most parameters one module holds itself: what ZeRO-3 gathers at once (DeepSpeed's
        stage3.model_to_params). For every GPT-2 size it is the token embedding."""
        h, f = self.n_embd, self.mlp_width
        return max(self.vocab_size * h, self.n_positions * h, h * 3 * h + 3 * h, h * f + f, f * h + h)
