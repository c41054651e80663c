"""Item text -> item embeddings with a local transformers model folder (the data-preparation step before codebooks).

Sentence embeddings as sentence-transformers makes them for all-MiniLM-L6-v2 and its kind: the token states of
the model's last layer, mean-pooled over the real (unpadded) tokens, then L2-normalised. The model is read from a
local folder only (``local_files_only=True``): nothing is fetched from a hub. Texts are batched in order of
length, so a batch holds little padding; the rows come back in item order.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from semid.data import EMBEDDING_PREFIX, load_dataset
from semid.io import atomic_path
from semid.local_models import refuse_remote_code
from semid.safe_read import cut, is_int

log = logging.getLogger(__name__)

FIELDS = ("title", "attributes")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # (fullmatch: "$" took a trailing newline into a file name)


class Encoder(NamedTuple):
    """A tokenizer and model loaded from one folder."""

    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    path: Path


class EmbedResult(NamedTuple):
    """What :func:`embed_dataset` wrote."""

    path: Path  # DATA/item_emb_<name>.npy
    num_items: int
    dim: int
    seconds: float


def load_encoder(model_dir: str | os.PathLike[str], device: str | torch.device | None = None) -> Encoder:
    """Load a tokenizer and model from a local folder (no hub calls), in eval mode.

    Args:
        model_dir: a folder holding ``config.json``, the weights and the tokenizer files (``save_pretrained``).
        device: where the model runs; default CUDA when present, else CPU.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no model folder here (give a local folder written by `save_pretrained`; nothing is downloaded)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a transformers model folder (no config.json)")
    refuse_remote_code(path, "this model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        model = AutoModel.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer and model from this folder ({e})") from e
    _check_encoder(path, tokenizer, model)
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return Encoder(tokenizer, model.to(device).eval(), path)


def _check_encoder(path: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Refuse, naming the folder, what fails only in the first forward pass (a raw IndexError or transformers' advice
    to call ``add_special_tokens``): an encoder-decoder model, a tokenizer without a pad token (batches are padded),
    token ids past the model's vocabulary (a tokenizer of another model)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{path}: an encoder-decoder model ({model.config.model_type}); texts are embedded by an "
                         "encoder alone (a BERT-like or sentence-transformers folder)")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: its tokenizer has no pad token, and texts are embedded in padded batches; use a "
                         "BERT-like or sentence-transformers folder (or save the tokenizer with a pad token)")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"{path}: its tokenizer has {len(tokenizer):,} tokens but the model embeds {vocab:,}: the "
                         "tokenizer is another model's")


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder,
    *,
    batch_size: int = 64,
    max_length: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings of texts.

    Args:
        texts: N strings (an empty string is embedded from the special tokens alone).
        encoder: from :func:`load_encoder`.
        batch_size: texts per forward pass.
        max_length: tokens per text at most (longer texts are truncated).

    Returns:
        FloatArray (N, D), float32, rows of unit L2 norm; row i embeds texts[i].
    """
    if isinstance(texts, (str, bytes)):  # (a string was embedded character by character)
        raise TypeError(f"`texts` must be a sequence of strings, got one {type(texts).__name__}: pass [{cut(repr(texts))}]")
    _check_sizes(batch_size, max_length)
    tokenizer, model, _ = encoder
    device = next(model.parameters()).device
    limit = min(getattr(model.config, "max_position_embeddings", None) or max_length,
                getattr(tokenizer, "model_max_length", None) or max_length)  # (a longer input failed in the model)
    if max_length > limit:
        log.warning("`max_length` %d is more than this model reads (%d positions): texts are cut at %d tokens",
                    max_length, limit, limit)
        max_length = limit
    order = np.argsort(
        [-len(t) for t in texts], kind="stable"
    )  # longest first: similar lengths share a batch
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    with (
        torch.inference_mode(),
        tqdm(total=len(texts), unit="item", disable=not progress, desc="embed") as bar,
    ):
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
            out[rows] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
            bar.update(len(rows))
    return out


def _check_sizes(batch_size: object, max_length: object) -> None:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if not is_int(max_length) or max_length < 2:
        raise ValueError(f"`max_length` must be an int >= 2, got {max_length!r}")


def default_name(model_dir: str | os.PathLike[str]) -> str:
    """The embeddings' name from the model folder's name: "all-MiniLM-L6-v2" -> "all_minilm_l6_v2"."""
    return re.sub(r"[^a-z0-9]+", "_", Path(model_dir).resolve().name.lower()).strip("_") or "model"


def embed_dataset(
    data_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    fields: Sequence[str] = FIELDS,
    name: str | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> EmbedResult:
    """Embed every item of a dataset folder and write ``DATA/item_emb_<name>.npy`` (atomically).

    Args:
        data_dir: a dataset folder (``items.jsonl``, ``sequences.txt``).
        model_dir: a local transformers model folder.
        fields: which item fields make the text, in order ("title", "attributes"); joined as
            :meth:`semid.data.Catalogue.text` does (the recipe of the Beauty MiniLM embeddings).
        name: the file's ``<name>``; default from the model folder's name.
        overwrite: replace an existing ``item_emb_<name>.npy`` (else a FileExistsError before any work: the codebooks
            and runs made from it would no longer match it).

    Returns:
        EmbedResult(path, num_items, dim, seconds); the array is float32 (N, D), row i is item i + 1.
    """
    fields = tuple(fields)
    _check_sizes(batch_size, max_length)  # before the model and the dataset are read
    if not fields or any(f not in FIELDS for f in fields):
        raise ValueError(f"`fields` must be a non-empty list of {list(FIELDS)}, got {list(fields)!r}")
    name = default_name(model_dir) if name is None else name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"`name` must be letters, digits, '_', '.' or '-' (starting with a letter or digit), got {name!r}"
        )
    path = Path(data_dir) / f"{EMBEDDING_PREFIX}{name}.npy"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (codebooks and runs may have been made from it); give another "
                              "--name, or --overwrite to replace it")
    encoder = load_encoder(model_dir, device)
    dataset = load_dataset(data_dir)
    texts = dataset.catalogue.texts(fields)
    start = time.perf_counter()
    emb = embed_texts(texts, encoder, batch_size=batch_size, max_length=max_length, progress=progress)
    seconds = time.perf_counter() - start
    with atomic_path(path) as tmp:
        np.save(tmp, emb)
    log.info("embedded %d items with %s in %.1f s -> %s", len(texts), encoder.path, seconds, path)
    return EmbedResult(path, emb.shape[0], emb.shape[1], seconds)
