"""`semid prepare --format amazon2014|recbole|csv ... --out DIR`: raw data -> a dataset folder.

The work is done by :mod:`semid.prepare`; this module parses arguments and prints the report and the summary of
the folder written (read back with :func:`semid.data.load_dataset`, which checks it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semid.data import format_summary, load_dataset, summary
from semid.prepare import FORMATS, PrepareReport, prepare_amazon2014, prepare_csv, prepare_recbole

# flags that belong to one format: dest -> formats that take it
_FORMAT_FLAGS = {
    "reviews": ("amazon2014",),
    "meta": ("amazon2014",),
    "inter": ("recbole",),
    "item": ("recbole",),
    "interactions": ("csv",),
    "items": ("csv",),
    "user_column": ("recbole", "csv"),
    "item_column": ("recbole", "csv"),
    "time_column": ("recbole", "csv"),
    "title_column": ("csv",),
}
_REQUIRED = {"amazon2014": ("reviews", "meta"), "recbole": ("inter",), "csv": ("interactions",)}
_DEFAULT_COLUMNS = {
    "recbole": {"user_column": "user_id", "item_column": "item_id", "time_column": "timestamp"},
    "csv": {
        "user_column": "user",
        "item_column": "item",
        "time_column": "timestamp",
        "title_column": "title",
    },
}


DESCRIPTION = (
    "Convert raw interaction data into a dataset folder (items.jsonl, sequences.txt, users.tsv). "
    "Item and user ids are numbered 1.. in order of first appearance once all interactions are sorted by "
    "(timestamp, file order)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=FORMATS, help="the raw data's format")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument(
        "--kcore", type=int, default=0, help="iterative k-core filter on users and items (0 = off)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    g = p.add_argument_group("--format amazon2014")
    g.add_argument("--reviews", type=Path, help="reviews_<Category>_5.json.gz")
    g.add_argument("--meta", type=Path, help="meta_<Category>.json.gz")
    g = p.add_argument_group("--format recbole")
    g.add_argument("--inter", type=Path, help="<name>.inter")
    g.add_argument("--item", type=Path, help="<name>.item (optional: titles and attributes)")
    g = p.add_argument_group("--format csv")
    g.add_argument("--interactions", type=Path, help="CSV of interactions")
    g.add_argument("--items", type=Path, help="CSV of items (optional: titles and attributes)")
    g = p.add_argument_group("column names (recbole: field names without the :type; csv: header names)")
    g.add_argument("--user-column", help="default: user_id (recbole), user (csv)")
    g.add_argument("--item-column", help="default: item_id (recbole), item (csv)")
    g.add_argument("--time-column", help="default: timestamp")
    g.add_argument("--title-column", help="csv items file only; default: title")


def run(args: argparse.Namespace) -> int:
    fmt = args.format
    for dest, formats in _FORMAT_FLAGS.items():
        if getattr(args, dest) is not None and fmt not in formats:
            raise ValueError(f"--{dest.replace('_', '-')} does not apply to --format {fmt}")
    missing = [f"--{d}" for d in _REQUIRED[fmt] if getattr(args, d) is None]
    if missing:
        raise ValueError(f"--format {fmt} needs {' and '.join(missing)}")
    empty = [f"--{k.replace('_', '-')}" for k in _DEFAULT_COLUMNS.get(fmt, {}) if getattr(args, k) is not None and not getattr(args, k).strip()]
    if empty:  # (an empty name was replaced by the default without a word)
        raise ValueError(f"{' and '.join(empty)} is empty: name a column, or leave the flag out for the default")
    columns = {k: getattr(args, k) or v for k, v in _DEFAULT_COLUMNS.get(fmt, {}).items()}
    common = {"kcore": args.kcore, "overwrite": args.overwrite}
    if fmt == "amazon2014":
        report = prepare_amazon2014(args.reviews, args.meta, args.out, **common)
    elif fmt == "recbole":
        fields = {"user_field": columns["user_column"], "item_field": columns["item_column"]}
        fields["time_field"] = columns["time_column"]
        report = prepare_recbole(args.inter, args.item, args.out, **common, **fields)
    else:
        report = prepare_csv(args.interactions, args.items, args.out, **common, **columns)
    print(format_report(report))
    print()
    print(format_summary(summary(load_dataset(args.out))))
    return 0


def format_report(report: PrepareReport) -> str:
    """A few aligned lines for people, from a :class:`~semid.prepare.PrepareReport`."""
    r = report
    kcore = (
        f"dropped {r.kcore_interactions_dropped:,} interactions, {r.kcore_users_dropped:,} users, "
        f"{r.kcore_items_dropped:,} items"
        if r.kcore
        else "off"
    )
    rows = [
        ("format", r.format),
        ("written to", str(r.out)),
        ("interaction rows read", f"{r.rows_read:,}"),
        (
            "duplicate rows dropped",
            f"{r.duplicates_dropped:,} (same user, item and timestamp as an earlier row)",
        ),
        (f"{r.kcore}-core filter" if r.kcore else "k-core filter", kcore),
        ("kept", f"{r.users:,} users, {r.items:,} items, {r.interactions:,} interactions"),
        ("metadata rows read", f"{r.metadata_rows:,}"),
        ("items without metadata", f"{r.items_without_metadata:,} (kept with an empty title)"),
        ("metadata rows unused", f"{r.metadata_unused:,} (items without interactions)"),
        ("metadata rows repeated", f"{r.metadata_duplicates:,} (first kept)"),
    ]
    if r.stale_files_removed:
        rows.append(("stale files removed", ", ".join(r.stale_files_removed)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
