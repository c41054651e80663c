"""`semid choose-fusion --run RUN`: choose the hybrid decoder's fusion on validation users; writes RUN/hybrid.json."""

from __future__ import annotations

import argparse

from semid_cli.args import add_run, add_run_data, nonnegative_int, positive_int

DESCRIPTION = (
    "Choose how the hybrid decoder fuses the generative and dense heads (one of the fusions, fitted on "
    "validation users and chosen on others; T5 runs, whose generative scores cover the candidate pool only, "
    "leave out `full` and `levels`) and store it in "
    "RUN/hybrid.json for the run's checkpoint and IDs. `semid train` does this at its end for a run with a dense "
    "head; run it for a run trained before, after `semid add-items`, or with other settings. Never reads test users."
)

NUM_BEAMS = 20  # the T5 hybrid's beams when --num-beams is not given


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    add_run_data(p)
    p.add_argument("--users", type=positive_int, help="validation users (default: 2,000 to fit and 2,000 to choose for T5 runs; 5,000 and 5,000 for causal runs)")
    p.add_argument("--num-candidates", type=positive_int, default=50, help="candidates per list, C (default 50)")
    p.add_argument("--num-beams", type=positive_int, help="beams of the T5 hybrid's beam search: only max(20, C), the "
                   "beams it is served with (other counts are refused; so is any for causal runs, whose hybrid searches no beams)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="users decoded together")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the user sample")


def run(args: argparse.Namespace) -> int:
    from generator.decoding.registry import CAUSAL
    from generator.designs.registry import for_config
    from generator.runs.decoders import choose_run_fusion
    from generator.runs.folder import HYBRID_FILE, LOCK_FILE, check_same_data, load_run, read_config
    from semid.data import load_dataset
    from semid.io import folder_lock
    from semid.split import leave_one_out

    design = for_config(read_config(args.run)).name  # a run folder (a mistyped one is not made by the lock), before writing
    if args.num_beams is not None and design == CAUSAL:  # (the causal hybrid scores every item: no beam reads it)
        raise ValueError(f"--num-beams {args.num_beams}: the hybrid of a causal run searches no beams (it fuses the exact "
                         "scores of every item with the dense head's), so it would change nothing; leave out --num-beams")
    with folder_lock(args.run, LOCK_FILE, what="a training, add-items or choose-fusion"):
        r = load_run(args.run)
        N = r.ids.num_items
        C, served = min(args.num_candidates, N), max(min(NUM_BEAMS, N), min(args.num_candidates, N))
        if args.num_beams is not None and args.num_beams != served:  # (T5: at most C changed nothing; more is unserved)
            raise ValueError(f"--num-beams {args.num_beams}: a T5 run's hybrid takes its {C} candidates (--num-candidates) "
                             f"from a beam search of max(beams, candidates) beams, and is served with {served}: a fusion "
                             "chosen with other beams would not be the one served; leave out --num-beams")
        data = args.data if args.data is not None else r.data_dir
        check_same_data(r.config, r.path, data)  # a fusion chosen on other users or items is not the run's
        split = leave_one_out(load_dataset(data))
        beams = NUM_BEAMS if args.num_beams is None else args.num_beams
        chosen = choose_run_fusion(r, split, num_candidates=args.num_candidates, num_beams=beams,
                                   users=args.users, batch_size=args.batch_size, seed=args.seed)
    print(f"hybrid fusion {chosen} chosen on validation users -> {args.run / HYBRID_FILE}")
    return 0
