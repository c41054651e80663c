"""The flags several commands take with the same meaning, type and help, so that each command module states only its
own (``semid_cli.build_parser`` makes every command's parser and binds its ``run``). Nothing here imports torch or
generator at import time: ``semid digest --help`` loads neither (tests/test_cli_lazy.py).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

EXPECT_SHA256_SOURCE = "(a file from `semid digest --run RUN`, or its --combined hex)"


def positive_int(text: str) -> int:
    """A count that must be at least 1 (``--num-beams``, ``--batch-size``, ...)."""
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def nonnegative_int(text: str) -> int:
    """An int in [0, 2^32) (``--seed``: what numpy's generators take)."""
    if not text.isascii() or not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2^32), got {text!r}")
    return int(text)


def int_id(text: str, what: str = "id") -> int:
    """An id as typed: ASCII digits with an optional leading minus (``int`` also takes "1_2" as 12 and other scripts'
    digits; negative ids are left to the check of what they name). ``what`` names it in the error."""
    digits = text.strip()
    digits = digits[1:] if digits.startswith("-") else digits
    if not digits.isascii() or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not an int: use the digits 0-9 only, with an optional "
                                         "leading minus")
    return int(text)


def check_beams_used(num_beams: int | None, decoder: str) -> None:
    """Refuse ``--num-beams`` for a decoder (a resolved name) that searches no beams: it would change nothing."""
    from generator.decoding.registry import BEAMLESS

    if num_beams is not None and decoder in BEAMLESS:
        raise ValueError(f"--num-beams {num_beams}: decoder {decoder!r} searches no beams, so it would change nothing; "
                         "leave out --num-beams, or pass a decoder with beams (beam, hybrid)")


def positive_users(text: str) -> int | None:
    """A sample of users: a positive int, or "all" (None). ``--max-users`` and ``--eval-users`` take it."""
    if text == "all":
        return None
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int (users sampled) or 'all', got {text!r}")
    return int(text)


def add_run(p: argparse.ArgumentParser) -> None:
    """``--run RUN``, required: the run folder the command reads."""
    p.add_argument("--run", required=True, type=Path, help="run folder (from `semid train`)")


def add_dataset(p: argparse.ArgumentParser) -> None:
    """``--data DATA``, required: the dataset folder the command reads."""
    p.add_argument("--data", required=True, type=Path, help="dataset folder (items.jsonl, sequences.txt)")


def add_run_data(p: argparse.ArgumentParser, use: str = "") -> None:
    """``--data DATA``, optional: another dataset folder than the run's own; ``use`` says what for (" for titles")."""
    p.add_argument("--data", type=Path, help=f"dataset folder{use} (default: the one the run was trained on)")


def add_expect_sha256(p: argparse.ArgumentParser, source: str = EXPECT_SHA256_SOURCE) -> None:
    """``--expect-sha256 FILE_OR_HEX``: the digests the run must have (checked by ``generator.runs.pinning``)."""
    p.add_argument("--expect-sha256", metavar="FILE_OR_HEX", help="refuse the run unless its config, semantic IDs and "
                   f"checkpoint have these digests {source}")


def add_decoder(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--decoder NAME`` (default auto), one of the registered decoders; ``help``: the registry's when None."""
    # imported here, not at the top: only the commands that decode import generator, when they register
    from generator.designs import registry as designs

    p.add_argument("--decoder", default="auto", choices=designs.decoder_names(),
                   help=designs.decoder_help() if help is None else help)


def add_progress(p: argparse.ArgumentParser, help: str = "show a progress bar (default: on a terminal)") -> None:
    """``--progress / --no-progress``; None when neither is given (``console.progress_default`` decides)."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=help)


TABLE_DTYPES = ("float32", "float16", "bfloat16")  # generator.decoding.paths.TABLE_DTYPES (not imported: no torch here)


def add_table_dtype(p: argparse.ArgumentParser) -> None:
    """``--table-dtype {float32,float16,bfloat16}``: a causal run's serving tables (Recommender's ``table_dtype``)."""
    p.add_argument("--table-dtype", default="float32", choices=TABLE_DTYPES,
                   help="storage of a causal run's serving tables (edge tables and dense item vectors; default float32). "
                   "float16 / bfloat16 halve them (1 of the 1.3 GB a million items take); scores are still computed in "
                   "float32, from vectors rounded to 11 / 8 significant bits, so near-tied items may swap places: on "
                   "Beauty float16 changed 2%% of the users' top-10 lists (R@10 equal), bfloat16 14-18%% "
                   "(experiments/results/serve_tables16.md)")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def add_fields(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls`` (``--val-users`` for ``val_users``), parsed as the field's type
    (``int``, ``float``, ``str``, ``bool``, or one of them ``| None``), its help the field's ``metadata["help"]`` with
    the default; a flag not given is None (the dataclass's default)."""
    for f in fields(cls):
        name = str(f.type).removesuffix(" | None")
        if name not in _TYPES or "help" not in f.metadata or f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a flag needs a field of type {sorted(_TYPES)} (or None), a "
                            f"default and metadata['help'], got {f.type} {f.metadata}")
        shown = "none" if f.default is None else f"{f.default:,}" if _TYPES[name] is int else str(f.default)
        flag, text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default {shown})"
        if _TYPES[name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=f.name, type=_TYPES[name], default=None, help=text)


def fields_given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (:func:`add_fields`)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this machine cannot use, before any work (torch says it with a bare AssertionError
    from deep inside, after the run is loaded)."""
    if device is None:
        return
    import torch  # (here: the parsers load no torch)

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"`--device` must be a torch device such as cpu, cuda or cuda:1, got {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`--device` is {device!r}, but CUDA is not available on this machine (torch.cuda.is_available() is "
                "False); pass --device cpu, or leave --device out (cuda where available, else cpu)"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"`--device` is {device!r}, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`--device` is {device!r}, but MPS is not available on this machine; pass --device cpu")
