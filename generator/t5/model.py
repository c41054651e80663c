"""The generator: a T5 encoder-decoder over semantic-ID tokens (TIGER, Rajput et al. 2023).

Encoder input: ``[user token] + code tokens of the last <= 20 items`` (B, S). Decoder: ``bos, c_1 .. c_L`` predicts
``c_1 .. c_L, eos``. The model is stock ``transformers.T5ForConditionalGeneration`` built from a ``T5Config``
(no pretrained weights), with its vocabulary, pad, eos and decoder-start ids taken from the :class:`TokenLayout`.

A checkpoint stores the :class:`GeneratorConfig` and the layout next to the weights, so a model is rebuilt from
its file alone (:func:`load_checkpoint`). This file does not import lightning; ``generator.t5.system`` wraps it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from generator.models.config import check_fields, from_known
from semid.layout import TokenLayout


@dataclass(frozen=True)
class GeneratorConfig:
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    d_model: int = 128
    num_heads: int = 6
    d_kv: int = 64  # per head; num_heads * d_kv need not equal d_model in T5
    d_ff: int = 1024
    dropout: float = 0.1
    feed_forward_proj: str = "relu"  # T5 v1.0; "gated-gelu" is T5 v1.1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    item_level: bool = False  # one encoder position per history item (the sum of its code embeddings)

    def __post_init__(self) -> None:
        check_fields(self, positive=tuple(f.name for f in fields(self) if f.type == "int"), unit=("dropout",))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        return from_known(cls, d, "generator config keys")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, GeneratorConfig] = {
    # TIGER's published architecture: 4+4 layers, d_model 128, 6 heads of 64, MLP 1024, dropout 0.1
    "tiger": GeneratorConfig(),
    # about 6x fewer FLOPs, for quick runs and the demo on a 2-core CPU
    "cpu": GeneratorConfig(num_encoder_layers=2, num_decoder_layers=2, d_model=64, num_heads=4, d_kv=32, d_ff=256),
    # the cpu preset reading one position per history item (needs no user tokens)
    "item-t5": GeneratorConfig(num_encoder_layers=2, num_decoder_layers=2, d_model=64, num_heads=4, d_kv=32, d_ff=256,
                               item_level=True),
}


def preset(name: str) -> GeneratorConfig:
    """One of :data:`PRESETS` by name."""
    if name not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def build_model(config: GeneratorConfig, layout: TokenLayout) -> T5ForConditionalGeneration:
    """A randomly initialised T5 whose vocabulary is the layout's (V tokens)."""
    t5 = T5Config(
        vocab_size=layout.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout,
        feed_forward_proj=config.feed_forward_proj,
        pad_token_id=layout.pad_token_id,
        eos_token_id=layout.eos_token_id,
        decoder_start_token_id=layout.bos_token_id,
        bos_token_id=layout.bos_token_id,
        use_cache=True,
    )
    model = T5ForConditionalGeneration(t5)
    if config.item_level:
        if layout.num_user_tokens:
            raise ValueError(f"an item-level T5 has no user token: the layout must have 0 user tokens, got {layout.num_user_tokens}")
        model.encoder = ItemLevelEncoder(model.encoder, layout.num_levels)
    return model


class ItemLevelEncoder(torch.nn.Module):
    """The T5 encoder over one position per history item: the input vector of an item is the sum of its L code
    tokens' embeddings, so the encoder runs over S / L positions instead of S.

    Callers keep passing the code tokens ``input_ids`` (B, S) and their mask; the output has S positions again, each
    item's state repeated over its L tokens. Attention over L identical copies of a key and value is attention over
    one (the softmax weights of the copies add up), and T5's cross-attention has no position bias, so the decoder,
    the fast beam search and the dense head's mean pooling see exactly the item-level encoder.
    """

    main_input_name = "input_ids"  # what generate() asks an encoder

    def __init__(self, stack: torch.nn.Module, num_levels: int) -> None:
        super().__init__()
        self.stack, self.num_levels = stack, num_levels

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.stack.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        if input_ids is None:
            raise ValueError("an item-level T5 encoder takes code tokens `input_ids` (B, S), S a multiple of L")
        B, S = input_ids.shape
        L = self.num_levels
        if S % L:
            raise ValueError(f"`input_ids` must hold {L} code tokens per item (no user token), got S = {S}")
        items = self.stack.embed_tokens(input_ids).view(B, S // L, L, -1).sum(2)  # (B, S/L, D)
        mask = None if attention_mask is None else attention_mask.view(B, S // L, L)[..., 0]
        out = self.stack(inputs_embeds=items, attention_mask=mask, return_dict=True)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state.repeat_interleave(L, dim=1))


def seq2seq_loss(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean token cross-entropy of the target codes and eos (teacher forcing).

    Args:
        input_ids: LongTensor (B, S); attention_mask: LongTensor (B, S), 1 for real tokens.
        labels: LongTensor (B, L + 1): target code tokens then eos; -100 is ignored.
    Returns:
        scalar FloatTensor.
    """
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, L + 1): bos, c_1 .. c_L
    logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    # logits: (B, L + 1, V)
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), ignore_index=-100, label_smoothing=label_smoothing)
