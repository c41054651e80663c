"""The generator: a T5 encoder-decoder over semantic-ID tokens (TIGER, Rajput et al. 2023).

Encoder input: ``[user token] + code tokens of the last <= 20 items`` (B, S). Decoder: ``bos, c_1 .. c_L`` predicts
``c_1 .. c_L, eos``. The model is stock ``transformers.T5ForConditionalGeneration`` built from a ``T5Config``
(no pretrained weights), with its vocabulary, pad, eos and decoder-start ids taken from the :class:`TokenLayout`.

A checkpoint stores the :class:`GeneratorConfig` and the layout next to the weights, so a model is rebuilt from
its file alone (:func:`load_checkpoint`). This file does not import lightning; ``generator.training.t5_system`` wraps it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from semid.ids import SemanticIDs
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
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{f.name}` must be a positive int, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generator config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

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


# ---- checkpoints -------------------------------------------------------------------------------------------------
CHECKPOINT_KEY = "semid"  # where a checkpoint keeps {config, layout, ids_digest}
STATE_PREFIX = "model."  # the LightningModule keeps the T5 as `self.model`


def ids_digest(ids: SemanticIDs) -> str:
    """A fingerprint of which item has which code tuple (sha256 of the arrays)."""
    h = hashlib.sha256()
    h.update(np.asarray(ids.codebook_sizes, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(ids.item_ids).tobytes())
    h.update(np.ascontiguousarray(ids.codes).tobytes())
    return h.hexdigest()


def checkpoint_meta(config: GeneratorConfig, layout: TokenLayout, digest: str) -> dict[str, Any]:
    return {"config": config.to_dict(), "layout": layout.to_dict(), "ids_digest": digest}


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # a T5ForConditionalGeneration, or a generator.causal CausalGenerator
    config: Any  # GeneratorConfig or CausalConfig
    layout: TokenLayout
    ids_digest: str


INTEGRITY_KEY = "semid_integrity"  # {format, version, sha256}: what a checkpoint written by semid carries
CHECKPOINT_FORMAT = "semid.checkpoint"
CHECKPOINT_VERSION = 1


def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other value, in the order
    the containers hold them (a checkpoint loaded back gives the same digest; one changed byte of any tensor does
    not). The entry :data:`INTEGRITY_KEY` of the top-level dict is left out."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            items = [(k, v) for k, v in x.items() if not (x is obj and k == INTEGRITY_KEY)]
            h.update(f"D{len(items)}".encode())
            for k, v in items:
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):  # subclasses (namedtuples, torch.Size) load back as their base
            h.update(f"{'L' if isinstance(x, list) else 'T'}{len(x)}".encode())
            for v in x:
                feed(v)
        elif isinstance(x, bool) or x is None:
            h.update(f"{x};".encode())
        elif isinstance(x, int):  # IntEnum members too
            h.update(f"i{int(x)};".encode())
        elif isinstance(x, float):
            h.update(f"f{float(x)!r};".encode())
        elif isinstance(x, str):
            h.update(f"s{len(x)}:{x}".encode())
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def with_integrity(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` plus its format, version and :func:`content_digest` (checked by :func:`safe_load`)."""
    body = {k: v for k, v in checkpoint.items() if k != INTEGRITY_KEY}
    return {**body, INTEGRITY_KEY: {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "sha256": content_digest(body)}}


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` that runs no code: tensors, containers and primitives only (``weights_only=True``).

    A file that needs anything else (a crafted pickle, an object with ``__reduce__``) is refused with a ValueError
    naming the file, before any of it is executed. An empty, truncated or garbled file, and a checkpoint whose
    content no longer matches the digest semid wrote into it (:func:`with_integrity`), is a ValueError naming the
    file too. Checkpoints written before semid recorded digests (no :data:`INTEGRITY_KEY`) load unchecked.
    """
    path = Path(path)
    damaged = "restore it from a copy, or train again (a file semid writes is renamed into place complete, so this one was damaged afterwards)"
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint; {damaged}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" not in text and "Unsupported class" not in text:  # garbage, not a forbidden object
            raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted: {_first_reason(text)}); {damaged}") from None
        raise ValueError(
            f"{path}: refused: this file holds objects other than tensors and plain containers, which loading would "
            f"execute ({_first_reason(text)}); semid checkpoints never do, so it was not written by semid or has been "
            "tampered with"
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 (zip, EOF, decode and unpickler errors of a damaged file: all re-raised)
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted: {type(e).__name__}: {_first_reason(str(e))}); {damaged}") from None
    if isinstance(ckpt, dict) and INTEGRITY_KEY in ckpt:
        check_integrity(ckpt, path)
    return ckpt


def _first_reason(text: str) -> str:
    """The informative line of a torch.load error (its "Weights only load failed" preamble dropped)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "error" in ln.lower() and "Weights only" not in ln:
            return ln[:300]
    return (lines[-1] if lines else "no detail")[:300]


def check_integrity(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise ValueError naming ``path`` unless ``ckpt``'s format, version and content digest are what semid wrote."""
    meta = ckpt[INTEGRITY_KEY]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: `{INTEGRITY_KEY}` is not a semid checkpoint record ({meta!r}); the file was not written by semid")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta.get('version')!r}; this semid reads version {CHECKPOINT_VERSION}: use the semid that wrote it")
    if meta.get("sha256") != content_digest(ckpt):
        raise ValueError(
            f"{path}: corrupted: its content no longer matches the sha256 semid recorded when writing it (a changed "
            "byte in the weights or the training state); restore it from a copy, or train again"
        )


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Raise ValueError naming ``path`` and the first tensor of ``state`` holding NaN or inf values."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{path}: tensor `{name}` holds {bad} NaN or inf value(s) of {t.numel()}: the weights are unusable "
                "(training diverged, or the file was damaged); use another checkpoint or train again"
            )


def load_checkpoint(path: str | os.PathLike[str], ids: SemanticIDs | None = None) -> LoadedModel:
    """Rebuild the model from a checkpoint file alone; with ``ids``, refuse one whose vocabulary does not match.

    Returns the model in eval mode on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    ckpt = safe_load(path)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path}: not a semid generator checkpoint (no {CHECKPOINT_KEY!r} entry)")
    missing = [k for k in ("layout", "config", "ids_digest") if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: a damaged semid checkpoint (no {missing or ['state_dict']} in it); use another checkpoint or train again")
    layout = TokenLayout.from_dict(meta["layout"])
    if ids is not None:
        check_vocabulary(layout, meta["ids_digest"], ids, source=str(path))
    state = {k[len(STATE_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    check_finite(state, path)
    if meta["config"].get("design") == "causal":  # one position per item (generator.causal)
        from generator.models.causal import CausalConfig, CausalGenerator

        config = CausalConfig.from_dict(meta["config"])
        content = state["content"][1:] if "content" in state else None
        model = CausalGenerator(config, layout, state["item_tokens"][1:], content)
    else:
        config = GeneratorConfig.from_dict(meta["config"])
        model = build_model(config, layout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the model its own config describes ({str(e).splitlines()[0]}); the file is damaged") from None
    model.eval()
    return LoadedModel(model, config, layout, meta["ids_digest"])


def check_vocabulary(layout: TokenLayout, digest: str, ids: SemanticIDs, *, source: str) -> None:
    """Raise ValueError unless a model with ``layout`` (trained on IDs with ``digest``) can decode ``ids``."""
    if tuple(layout.codebook_sizes) != tuple(ids.codebook_sizes):
        raise ValueError(
            f"{source}: the checkpoint's vocabulary has codebook sizes {list(layout.codebook_sizes)} "
            f"(V = {layout.vocab_size}), but the semantic IDs have {list(ids.codebook_sizes)} "
            f"(V = {ids.layout(layout.num_user_tokens).vocab_size}): it was trained with other semantic IDs"
        )
    if digest != ids_digest(ids):
        raise ValueError(
            f"{source}: the checkpoint was trained with other semantic IDs (same codebook sizes "
            f"{list(ids.codebook_sizes)}, but items map to different code tuples); use the run's own semantic_ids.npz"
        )
