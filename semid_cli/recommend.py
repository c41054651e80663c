"""`semid recommend --run RUN --history 12,45,99 [-k 10] [--json]`: ranked items with titles and scores."""

from __future__ import annotations

import argparse
import json
import re
import sys

from semid_cli.args import add_decoder, add_expect_sha256, add_run, add_run_data, check_beams_used, int_id


def _history(text: str) -> list[int]:
    """Item ids separated by commas or spaces ("12,45,99", "12, 45, 99" or "12 45 99"), each ASCII digits."""
    try:
        items = [int_id(t, "item id") for t in re.split(r"[,\s]+", text) if t]
    except argparse.ArgumentTypeError as e:  # (int_id's message names the token and what is allowed)
        raise argparse.ArgumentTypeError(f"{e}; expected item ids separated by commas or spaces, got {text!r}") from None
    return items


def _user_id(text: str) -> int:
    return int_id(text, "user id")


DESCRIPTION = (
    "Top-k items for a history (item ids, oldest first), by default by constrained beam search; every "
    "item returned is in the catalogue, best first. Scores (higher is better) are what the decoder's are (see "
    "--decoder): for beam, generate and exact the item's log-likelihood, the sum over levels of its codes' "
    "log-probabilities renormalised over what the prefix tree allows."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--history", required=True, type=_history, help="item ids, oldest first: 12,45,99")
    p.add_argument("-k", type=int, default=10, help="items to return (default 10)")
    p.add_argument("--num-beams", type=int, help="beams (>= k, plus the history's distinct items unless "
                   "--no-exclude-history; default 20, doubled until they hold that, as `semid serve` decodes); "
                   "not for exact and dense, which search no beams")
    p.add_argument("--user", type=_user_id, help="user id, hashed into the run's user tokens (default: none)")
    p.add_argument("--exclude-history", action=argparse.BooleanOptionalAction, default=True,
                   help="leave the history's items out (default, as `semid serve` does); --no-exclude-history ranks "
                   "every item, as the benchmark protocol does")
    add_decoder(p)
    p.add_argument("--alpha", type=float, help="hybrid blend weight (default: the one chosen on validation, RUN/hybrid.json)")
    add_run_data(p, " for titles")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    add_expect_sha256(p)


def run(args: argparse.Namespace) -> int:
    from generator.runs.pinning import pin
    from generator.runs.recommender import DEFAULT_BEAMS, Recommender

    loaded = pin(args.run, args.expect_sha256)  # checked before anything of the run is loaded, and again after
    rec = Recommender.from_run(args.run, decoder=args.decoder, decoders=[args.decoder], alpha=args.alpha,
                               num_beams=DEFAULT_BEAMS, data=args.data)
    loaded()
    if args.user is not None and not rec.run.use_user_tokens:  # (the library warns and goes on; here it was missed)
        raise ValueError(f"--user {args.user}: {args.run} was trained without user tokens, so a user id changes nothing "
                         "(only T5 runs trained with --user-tokens read one): drop --user")
    user_ids = [args.user] if args.user is not None else None
    check_beams_used(args.num_beams, rec.resolve(args.decoder))
    try:
        out = rec.recommend([args.history], k=args.k, user_ids=user_ids, num_beams=args.num_beams,
                            exclude_history=args.exclude_history)[0]
    except RuntimeError as e:  # a decoder returned items outside the catalogue; semid_cli.main does not catch these
        if args.debug:
            raise
        print(f"semid recommend: error: {e}", file=sys.stderr)
        return 1
    if rec.catalogue is None:
        print(f"semid recommend: no titles ({rec.run.data_dir} is missing); pass --data", file=sys.stderr)
    titles = rec.titles if rec.catalogue is not None else (lambda items: [""] * len(list(items)))
    names = titles(out.items)
    rows = [{"rank": i + 1, "item_id": int(item), "score": float(score), "title": name}
            for i, (item, score, name) in enumerate(zip(out.items, out.scores, names, strict=True))]
    if args.json:
        print(json.dumps({"history": args.history, "k": args.k, "version": rec.version, "items": rows}, indent=2))
        return 0
    print(f"history: {', '.join(f'{i} ({t[:40]})' for i, t in zip(args.history, titles(args.history), strict=True))}")
    for row in rows:
        print(f"{row['rank']:>3}. {row['item_id']:>7}  {row['score']:>8.3f}  {row['title'] or '(no title)'}")
    return 0
