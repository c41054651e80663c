"""Loading a local transformers folder without running any code it carries.

A transformers folder can name Python classes of its own in an ``auto_map`` (``tokenizer_config.json`` or
``config.json``, with the ``.py`` files beside them); with ``trust_remote_code`` unset, transformers asks on the
terminal whether to run them, and runs them on "y". semid never runs such code and never asks: every load says
``trust_remote_code=False, local_files_only=True`` at its call, and :func:`refuse_remote_code` refuses a folder that
names code of its own before transformers reads it, naming the file and the key.

    refuse_remote_code(folder, "--tokenizer")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# the files transformers reads to find a tokenizer's or a model's class
CLASS_FILES = ("tokenizer_config.json", "config.json")
REMOTE_CODE_KEY = "auto_map"


def refuse_remote_code(folder: str | os.PathLike[str], what: str = "the folder") -> None:
    """Raise ValueError naming the file and the key if ``folder``'s ``tokenizer_config.json`` or ``config.json``
    has an ``auto_map`` (classes defined by Python files of the folder) or cannot be read as a JSON object.

    Args:
        folder: a local transformers folder (tokenizer or model).
        what: how the user named it (``--tokenizer``, ``train.encoder`` ...), for the message.
    """
    folder = Path(folder)
    for name in CLASS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); {what} must be a transformers folder written by "
                             "`save_pretrained`") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a JSON object; {what} must be a transformers folder written by `save_pretrained`")
        if REMOTE_CODE_KEY in doc:
            code = doc[REMOTE_CODE_KEY]
            named = ", ".join(sorted(map(str, code))) if isinstance(code, dict) else repr(code)
            raise ValueError(
                f"{path}: key `{REMOTE_CODE_KEY}` ({named}) names Python code in the folder; semid never runs a model "
                f"folder's own code (trust_remote_code=False), so {what} is refused: use a folder whose classes "
                f"transformers ships (no `{REMOTE_CODE_KEY}`)"
            )
