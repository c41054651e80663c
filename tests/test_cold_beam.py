"""ColdStartBeam on hand-built IDs: cold items join the beam's top-k through shared prefixes, capped at ceil(eps*k)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from generator.decoding.cold import ColdStartBeam
from generator.decoding.protocol import LOG_LIKELIHOOD, PREFIX_MATCHED, Decoder, Histories, Ranking
from semid.ids import SemanticIDs
from semid.prefix_index import prefix_key

# base codes (3 levels of 4); prefix = the first two
WARM = {1: (0, 0, 0), 2: (0, 1, 0), 3: (1, 0, 0), 4: (1, 1, 0), 5: (2, 0, 0), 6: (3, 3, 0)}
COLD = {7: (0, 0, 3), 8: (1, 1, 2), 9: (2, 2, 1), 10: (0, 0, 2)}  # 7, 10 share item 1's prefix; 8 item 4's; 9 none


@pytest.fixture
def ids() -> SemanticIDs:
    warm = SemanticIDs.from_codes(np.array(list(WARM.values())), (4, 4, 4), extra_level_size=2)
    return warm.add_items(np.array(list(COLD.values())), np.array(list(COLD)))


def beam_result(ids: SemanticIDs, items: list[list[int]], scores: list[list[float]]) -> Ranking:
    it = np.array(items)
    codes = torch.from_numpy(ids.codes_of(it.ravel()).reshape(*it.shape, -1))
    return Ranking(torch.from_numpy(it), torch.tensor(scores), codes, LOG_LIKELIHOOD, True)


class FixedBeam:
    """A beam decoder that returns a fixed ranking (its first k columns) and records how it was called."""

    name, score, leaves = "beam", LOG_LIKELIHOOD, True

    def __init__(self, res: Ranking | None = None, num_beams: int = 5) -> None:
        self.res, self.num_beams, self.calls = res, num_beams, []

    def __call__(self, histories: Histories, k: int) -> Ranking:
        self.calls.append((k, self.num_beams))
        assert self.res is not None
        return Ranking(self.res.items[:, :k], self.res.scores[:, :k], self.res.codes[:, :k], self.res.score, self.res.leaves)


def cold_beam(ids: SemanticIDs, cold: list[int] | np.ndarray, beam: Decoder | None = None, **options: object) -> ColdStartBeam:
    return ColdStartBeam(beam if beam is not None else FixedBeam(), ids, np.asarray(cold), **options)


def test_prefix_keys_mixed_radix() -> None:
    codes = torch.tensor([[1, 2, 3, 0], [3, 3, 0, 1], [-1, 0, 0, 0]])
    assert prefix_key(codes[:, :2], (4, 4, 4, 2)).tolist() == [1 * 4 + 2, 3 * 4 + 3, -1]


def test_cold_item_takes_its_candidates_score(ids: SemanticIDs) -> None:
    res = beam_result(ids, [[4, 1, 2, 3, 5]], [[-1.0, -2.0, -3.0, -4.0, -5.0]])
    out = cold_beam(ids, list(COLD), epsilon=0.25).merge(res, 4)  # ceil(0.25 * 4) = 1 cold slot
    assert out.items.tolist() == [[4, 8, 1, 2]]  # 8 shares 4's prefix: right after it, with its score
    assert out.scores.tolist() == [[-1.0, -1.0, -2.0, -3.0]]
    assert out.codes[0, 1].tolist() == ids.codes_of(np.array([8]))[0].tolist()


@pytest.mark.parametrize(("epsilon", "k", "want"), [
    (0.1, 5, [4, 8, 1, 2, 3]),      # ceil(0.5) = 1
    (0.5, 4, [4, 8, 1, 7]),         # 2: the best-scored matches; 7 before 10 (same candidate, smaller id)
    (1.0, 5, [4, 8, 1, 7, 10]),
    (0.0, 4, [4, 1, 2, 3]),         # no cold slot: the beam's own top-k
])
def test_cold_items_capped_at_ceil_epsilon_k(ids: SemanticIDs, epsilon: float, k: int, want: list[int]) -> None:
    res = beam_result(ids, [[4, 1, 2, 3, 5]], [[-1.0, -2.0, -3.0, -4.0, -5.0]])
    out = cold_beam(ids, list(COLD), epsilon=epsilon).merge(res, k)
    assert out.items.tolist() == [want]
    assert int(np.isin(out.items.numpy(), list(COLD)).sum()) <= math.ceil(epsilon * k)


def test_max_per_prefix(ids: SemanticIDs) -> None:
    res = beam_result(ids, [[1, 2, 3, 4, 5]], [[-1.0, -2.0, -3.0, -4.0, -5.0]])
    out = cold_beam(ids, list(COLD), epsilon=1.0, max_per_prefix=1).merge(res, 4)
    assert out.items.tolist() == [[1, 7, 2, 3]]  # only the first cold item of prefix (0, 0)


def test_no_duplicates_when_the_beam_returns_a_cold_item(ids: SemanticIDs) -> None:
    # the beam itself returns cold item 7 (at -2), which also matches candidate 1's prefix (at -1): kept once, at -1
    res = beam_result(ids, [[1, 7, 2, 3], [3, 7, 1, 4]], [[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -3.0, -4.0]])
    out = cold_beam(ids, list(COLD), epsilon=0.5).merge(res, 4)
    assert out.items.tolist() == [[1, 7, 10, 2], [3, 7, 10, 1]]
    assert out.scores.tolist() == [[-1.0, -1.0, -1.0, -3.0], [-1.0, -2.0, -2.0, -3.0]]
    for row in out.items.tolist():
        assert len(set(row)) == len(row)


def test_without_matches_equals_the_beam(ids: SemanticIDs) -> None:
    res = beam_result(ids, [[3, 2, 5], [5, 6, 2]], [[-0.5, -0.7, -2.0], [-1.0, -1.5, -3.0]])
    beam = FixedBeam(res, num_beams=3)
    dec = cold_beam(ids, list(COLD), beam, epsilon=0.5)
    out = dec(Histories(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool)), 2)
    assert beam.calls == [(3, 3)]  # C = max(k, num_beams) candidates, searched with as many beams
    assert beam.num_beams == 3  # the caller's decoder is left as it was
    for field in ("items", "scores", "codes"):
        assert torch.equal(getattr(out, field), getattr(res, field)[:, :2])
    assert (out.score, out.leaves) == (PREFIX_MATCHED, False)


def test_empty_beam_slots_never_match(ids: SemanticIDs) -> None:
    res = beam_result(ids, [[2, 3, 5]], [[-1.0, -2.0, -3.0]])
    res = Ranking(torch.tensor([[2, 3, -1]]), torch.tensor([[-1.0, -2.0, float("-inf")]]),
                  torch.where(torch.tensor([[False, False, True]]).unsqueeze(-1), -1, res.codes), LOG_LIKELIHOOD, True)
    out = cold_beam(ids, list(COLD), epsilon=1.0).merge(res, 2)
    assert out.items.tolist() == [[2, 3]]


def test_random_beams_keep_the_invariants(ids: SemanticIDs) -> None:
    g = np.random.default_rng(0)
    items = np.stack([g.permutation(np.arange(1, 11))[:6] for _ in range(50)])
    scores = np.sort(g.normal(size=items.shape).astype(np.float32), axis=1)[:, ::-1].copy()
    res = beam_result(ids, items.tolist(), scores.tolist())
    for epsilon, k in [(0.1, 5), (0.3, 6), (0.5, 3)]:
        out = cold_beam(ids, list(COLD), epsilon=epsilon).merge(res, k)
        warm_in = (~np.isin(items, list(COLD))).sum(1)
        capped = warm_in >= k - math.ceil(epsilon * k)  # rows with enough warm candidates to fill the rest
        n_cold = np.isin(out.items.numpy(), list(COLD)).sum(1)
        assert (n_cold[capped] <= math.ceil(epsilon * k)).all()
        assert (out.items.sort(1).values.diff(dim=1) != 0).all()  # no duplicates
        assert (out.scores.diff(dim=1)[torch.from_numpy(capped)] <= 0).all()  # best first
        assert (out.items >= 1).all()


def test_bad_arguments(ids: SemanticIDs) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        cold_beam(ids, [7], epsilon=1.5)
    with pytest.raises(ValueError, match="prefix_levels"):
        cold_beam(ids, [7], prefix_levels=0)
    with pytest.raises(ValueError, match="cold_item_ids"):
        cold_beam(ids, [99])


def test_a_call_leaving_the_history_out_keeps_ks_cold_share_among_the_items_it_keeps() -> None:
    """Asked for k plus the history's items with the cap of k (``exclusion.with_cold_cap``), a cold item of the
    history (dropped after) takes no cold slot: the user still gets k's share of other cold items."""
    from generator.runs.exclusion import drop_history, with_cold_cap

    n = 40  # items 1..30 warm, 31..40 cold; cold item c shares its first code with warm item c - 30
    codes = np.stack([np.arange(n) % 10, np.arange(n) // 10, np.zeros(n, int)], 1)
    ids = SemanticIDs(codes, np.arange(1, n + 1), (10, 4, 1))
    items = torch.arange(1, 13)[None]  # the beam's warm items, best first
    beam = FixedBeam(Ranking(items, -torch.arange(12.0)[None], torch.from_numpy(ids.codes_of(items.numpy())),
                             LOG_LIKELIHOOD, True), num_beams=20)
    dec = ColdStartBeam(beam, ids, np.arange(31, 41), epsilon=0.1, prefix_levels=1, max_per_prefix=1)
    history = np.array([31, 25])  # cold item 31 (item 1's prefix) is in the history
    tokens = torch.from_numpy(ids.rows_of(history) + 1)[None]
    out = with_cold_cap(dec, 10)(Histories(tokens, torch.ones_like(tokens, dtype=torch.bool)), 12)
    kept, _ = drop_history(out.items.numpy(), out.scores.numpy(), [history], 10)
    assert kept.shape == (1, 10) and not set(kept[0].tolist()) & set(history.tolist())
    assert int(np.isin(kept, np.arange(31, 41)).sum()) == 1  # ceil(0.1 x 10): one cold item, not the history's
