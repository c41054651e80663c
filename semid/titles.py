"""Item titles as token sequences: a subword tokenizer, the duplicate-title rule, and the title prefix tree (GENRE).

    tok = TitleTokenizer.train(titles, vocab_size=4096)      # or TitleTokenizer.from_pretrained(DIR), local only
    index = TitleIndex.build(tok, titles, item_ids, max_tokens=32)
    index.tree                                               # PrefixTree over every title + eos

**Vocabulary.** ``[tokenizer's ids 0 .. V_tok) | D disambiguation tokens]``: the tokenizer's own pad and eos ids
are the tree's pad and end tokens; ``V = V_tok + D``. The trained tokenizer is a byte-level BPE (``tokenizers``),
so ``decode(encode(title)) == title`` exactly for any text; a local tokenizer (``--tokenizer DIR``) is whatever that
folder holds, read with ``local_files_only=True``.

**Titles that are not unique** (Beauty: 28 groups of identical titles, one of them the 7 empty titles). Rule: two
items whose titles tokenise to the same (truncated) sequence form a group; every item of a group of two or more,
and every item with an empty title, gets one *disambiguation token* after its title: ``dup_j`` where j is the
item's rank in its group in the order the items are given (by item id where, as in semid's runs, they come ascending; 0, 1, ...). A unique title ends with eos directly. So every tree leaf is one
item, the tree has no duplicate sequence, and the model learns which of the identical titles comes next, as the
extra semantic-ID level does for colliding codes. Titles are cut to ``max_tokens`` tokens before grouping (a cut
that makes two titles equal makes a group).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from semid._tree_build import as_padded
from semid.io import atomic_open
from semid.local_models import refuse_remote_code
from semid.prefix_index import rank_within_groups
from semid.safe_read import is_int
from semid.tree import PrefixTree

log = logging.getLogger(__name__)

PAD, EOS = "<|pad|>", "<|endoftext|>"  # the trained tokenizer's special tokens (ids 0 and 1)
META_FILE = "title_tokenizer.json"  # RUN/tokenizer/title_tokenizer.json: which kind of tokenizer the folder holds
KINDS = ("bpe", "transformers")


class TitleTokenizer:
    """Titles <-> token ids, with the pad and eos ids the title tree uses.

    Make one with :meth:`train` (byte-level BPE on the catalogue's titles) or :meth:`from_pretrained` (a local
    transformers tokenizer folder); :meth:`save` / :meth:`load` keep it in a run folder.
    """

    def __init__(self, backend: Any, kind: str, pad_id: int, eos_id: int, vocab_size: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
        if pad_id == eos_id:
            raise ValueError(f"the tokenizer's pad and eos ids must differ, got {pad_id} for both")
        self.backend, self.kind = backend, kind
        self.pad_id, self.eos_id, self.vocab_size = int(pad_id), int(eos_id), int(vocab_size)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, titles: Sequence[str], *, vocab_size: int = 4096) -> TitleTokenizer:
        """A byte-level BPE trained on ``titles`` (pad id 0, eos id 1); nothing is downloaded."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not is_int(vocab_size) or vocab_size < 260:
            raise ValueError(f"`vocab_size` must be an int >= 260 (256 bytes + specials), got {vocab_size!r}")
        texts = [t for t in titles if t]
        if not texts:
            raise ValueError("cannot train a tokenizer: every title is empty")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[PAD, EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, "bpe", tok.token_to_id(PAD), tok.token_to_id(EOS), tok.get_vocab_size())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> TitleTokenizer:
        """The tokenizer of a local transformers folder (``local_files_only=True``, no code of the folder's own run:
        ``semid.local_models``); it must have pad and eos (or sep). A title run's own ``tokenizer/`` folder (written by
        :meth:`save`, whose trained BPE has no transformers config) is read as :meth:`load` reads it."""
        path = Path(folder)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no tokenizer folder here (`--tokenizer` takes a local folder; nothing is downloaded)")
        if (path / META_FILE).is_file():  # (it was refused: "needs a pad token and an eos", which its record names)
            return cls.load(path)
        return cls._from_transformers(path)

    @classmethod
    def _from_transformers(cls, path: Path) -> TitleTokenizer:
        from transformers import AutoTokenizer

        refuse_remote_code(path, "this tokenizer folder")
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: cannot load a tokenizer from this folder ({e})") from e
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if tok.pad_token_id is None or eos is None:
            raise ValueError(f"{path}: the tokenizer needs a pad token and an eos (or sep) token; it has pad "
                             f"{tok.pad_token_id!r}, eos {tok.eos_token_id!r}, sep {tok.sep_token_id!r}")
        return cls(tok, "transformers", tok.pad_token_id, eos, len(tok))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the tokenizer into ``folder`` (created), with a small file naming its kind and special ids."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        if self.kind == "bpe":
            self.backend.save(str(path / "tokenizer.json"))
        else:
            self.backend.save_pretrained(path)
        with atomic_open(path / META_FILE, "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, "pad_id": self.pad_id, "eos_id": self.eos_id, "vocab_size": self.vocab_size}, f)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> TitleTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        path = Path(folder)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a title tokenizer folder (written by `semid train --target title`)")
        again = "restore the run's tokenizer folder, or train again"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise TypeError(f"a JSON object expected, got {type(meta).__name__}")
            missing = [k for k in ("kind", "pad_id", "eos_id", "vocab_size") if k not in meta]
            if missing:
                raise KeyError(f"no {missing}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: a damaged title tokenizer record ({type(e).__name__}: {e}); {again}") from None
        if meta.get("kind") == "bpe":
            from tokenizers import Tokenizer

            try:
                backend = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 (the tokenizers library raises a bare Exception for any bad file)
                raise ValueError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({str(e)[:200]}); {again}") from None
            out = cls(backend, "bpe", meta["pad_id"], meta["eos_id"], meta["vocab_size"])
        elif meta.get("kind") == "transformers":
            out = cls._from_transformers(path)
        else:
            raise ValueError(f"{meta_path}: unknown tokenizer kind {meta.get('kind')!r}; known: {list(KINDS)}")
        if (out.pad_id, out.eos_id, out.vocab_size) != (meta["pad_id"], meta["eos_id"], meta["vocab_size"]):
            raise ValueError(f"{path}: the tokenizer's pad/eos/vocabulary ({out.pad_id}, {out.eos_id}, {out.vocab_size}) "
                             f"differ from those recorded ({meta['pad_id']}, {meta['eos_id']}, {meta['vocab_size']})")
        return out

    # ---- text <-> ids ------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with no special tokens added."""
        texts = list(texts)
        if self.kind == "bpe":
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self.backend(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence; ids outside the tokenizer (pad, eos, disambiguation tokens) are dropped."""
        special = {self.pad_id, self.eos_id}
        clean = [[int(t) for t in s if int(t) not in special and 0 <= int(t) < self.vocab_size] for s in sequences]
        if self.kind == "bpe":
            return self.backend.decode_batch(clean, skip_special_tokens=False)
        return self.backend.batch_decode(clean, skip_special_tokens=True)


class TitleIndex(NamedTuple):
    """Every item's title as tree tokens (title, disambiguation token where the rule gives one).

    sequences: LongTensor-like int64 array (N, T) padded with -1, no eos; row i is item ``item_ids[i]``.
    lengths: (N,) tokens per row (>= 1). num_dup: D disambiguation tokens (ids V_tok .. V_tok + D - 1).
    tree: the prefix tree of every row + eos (pad self-loops on leaves); leaf values are item ids.
    """

    sequences: np.ndarray
    lengths: np.ndarray
    item_ids: np.ndarray
    num_dup: int
    vocab_size: int  # V = the tokenizer's vocabulary + num_dup
    pad_id: int
    eos_id: int
    tree: PrefixTree

    @classmethod
    def build(cls, tokenizer: TitleTokenizer, titles: Sequence[str], item_ids: Sequence[int] | np.ndarray, *,
              max_tokens: int = 32, num_dup: int | None = None) -> TitleIndex:
        """Tokenise, cut to ``max_tokens``, apply the duplicate rule, build the tree.

        Args:
            num_dup: the disambiguation tokens the vocabulary has room for (a trained model's); default: as many as
                the largest group needs. A catalogue that needs more is an error.
        """
        if not is_int(max_tokens) or max_tokens < 1:
            raise ValueError(f"`max_tokens` must be a positive int, got {max_tokens!r}")
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(titles) != item_ids.shape[0]:
            raise ValueError(f"`titles` ({len(titles)}) and `item_ids` ({item_ids.shape[0]}) must have the same length")
        encoded = [ids[:max_tokens] for ids in tokenizer.encode(titles)]
        for i, ids in enumerate(encoded):
            if tokenizer.pad_id in ids or tokenizer.eos_id in ids:
                raise ValueError(f"item {int(item_ids[i])}: its title {titles[i]!r} tokenises to the tokenizer's pad or eos "
                                 "token; the title tree needs them free (remove that text from the title)")
        rank, group_size = dup_ranks(encoded)
        needs = (group_size > 1) | (np.array([len(s) for s in encoded]) == 0)
        need_dup = int(rank[needs].max()) + 1 if needs.any() else 0
        if num_dup is None:
            num_dup = need_dup
        elif need_dup > num_dup:
            raise ValueError(f"the catalogue needs {need_dup} disambiguation tokens (a group of {need_dup} identical "
                             f"titles), the vocabulary has {num_dup}: retrain on this catalogue")
        V_tok = tokenizer.vocab_size
        rows = [s + [V_tok + int(r)] if n else s for s, r, n in zip(encoded, rank, needs, strict=True)]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        seqs = np.full((len(rows), int(lengths.max())), -1, dtype=np.int64)
        for i, r in enumerate(rows):  # loop over items at build time only (tokenizers hand back lists)
            seqs[i, : len(r)] = r
        V = V_tok + num_dup
        tree = PrefixTree.from_sequences(seqs, item_ids, V, end_token=tokenizer.eos_id, pad_token=tokenizer.pad_id)
        log.info("title tree: %d items, %d groups of identical titles, %d disambiguation tokens, %d nodes",
                 len(rows), int(((group_size > 1) & (rank == 0)).sum()), num_dup, tree.num_nodes)
        return cls(seqs, lengths, item_ids, num_dup, V, tokenizer.pad_id, tokenizer.eos_id, tree)

    def padded_targets(self) -> np.ndarray:
        """(N, T + 1) int64: each row + eos, then pad (the training targets)."""
        N, T = self.sequences.shape
        out = np.full((N, T + 1), self.pad_id, dtype=np.int64)
        real = self.sequences >= 0
        out[:, :T][real] = self.sequences[real]
        out[np.arange(N), self.lengths] = self.eos_id
        return out


def dup_ranks(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each sequence among identical ones, in input order; size of its group), both int64 (N,)."""
    return rank_within_groups(as_padded(sequences))
