"""Title targets: the tokenizer, the duplicate-title rule and the title tree (against a dict trie), the constrained
title beam (against brute-force scoring of every title), and grounding (BIGRec) of free titles and free codes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from generator.decoding.beam import leaf_items
from generator.decoding.grounding import CODES_GROUNDED, CodeGrounder, GroundedCodeDecoders
from generator.decoding.titles import TitleDecoders, lookup_generated, title_beam_search
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.titles import TitleConfig, TitleGenerator
from semid.embed import embed_texts, load_encoder
from semid.titles import TitleIndex, TitleTokenizer
from semid.tree import PrefixTree
from tests.conftest import TINY_ITEMS
from tests.reference import DictTrie
from tests.test_embed import model_dir  # noqa: F401 (the tiny BERT fixture: a local encoder and tokenizer folder)
from tests.test_generator_helpers import random_ids

V_TOK = 12  # the fake tokenizer's vocabulary: 0 pad, 1 eos, words 2..11


class WordTokenizer:
    """A tokenizer whose texts are space-separated token ids (the title tree's tests need exact control)."""

    pad_id, eos_id, vocab_size = 0, 1, V_TOK

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[int(w) for w in t.split()] for t in texts]

    def decode(self, seqs: list[list[int]]) -> list[str]:
        return [" ".join(str(t) for t in s if 2 <= t < V_TOK) for s in seqs]


@st.composite
def title_sets(draw: st.DrawFn) -> list[str]:
    """Titles with duplicates, empty titles and titles that are prefixes of others."""
    base = draw(st.lists(st.lists(st.integers(2, V_TOK - 1), min_size=0, max_size=4), min_size=1, max_size=12))
    titles = [list(t) for t in base]
    for t in list(titles):  # prefixes and copies of drawn titles
        if t and draw(st.booleans()):
            titles.append(t[: draw(st.integers(0, len(t) - 1))])
        if draw(st.integers(0, 3)) == 0:
            titles.append(list(t))
    order = draw(st.permutations(range(len(titles))))
    return [" ".join(map(str, titles[i])) for i in order]


@settings(max_examples=60, deadline=None)
@given(title_sets(), st.integers(2, 6))
def test_title_tree_matches_a_dict_trie_and_the_duplicate_rule(titles: list[str], max_tokens: int) -> None:
    tok = WordTokenizer()
    item_ids = np.arange(1, len(titles) + 1) * 10
    index = TitleIndex.build(tok, titles, item_ids, max_tokens=max_tokens)
    # the rule, from its statement: cut, then identical (or empty) titles get dup_<rank by item id>
    cut = [tuple(t[:max_tokens]) for t in tok.encode(titles)]
    count, seen = Counter(cut), Counter()
    expected = []
    for t in cut:
        if count[t] > 1 or not t:
            expected.append([*t, V_TOK + seen[t]])
        else:
            expected.append(list(t))
        seen[t] += 1
    got = [list(row[row >= 0]) for row in index.sequences]
    assert got == expected
    assert index.num_dup == max([seen[t] for t in seen if count[t] > 1 or not t], default=0)
    assert index.vocab_size == V_TOK + index.num_dup
    trie = DictTrie(expected, item_ids.tolist(), end_token=tok.eos_id)
    tree = index.tree
    for seq, item in zip(expected, item_ids, strict=True):
        full = [*seq, tok.eos_id]
        for j in range(len(full)):  # every prefix allows what the trie allows
            node = tree.walk(torch.tensor([full[:j]], dtype=torch.long).view(1, -1))
            assert set(torch.nonzero(tree.allowed_mask(node)[0]).view(-1).tolist()) == trie.allowed(full[:j])
        assert int(tree.lookup(torch.tensor([full + [tok.pad_id, tok.pad_id]]))[0]) == item == trie.value(full)
    assert len({tuple(s) for s in expected}) == len(expected)  # every leaf is one item


def test_a_catalogue_needing_more_dup_tokens_than_the_vocabulary_is_an_error() -> None:
    with pytest.raises(ValueError, match="disambiguation tokens"):
        TitleIndex.build(WordTokenizer(), ["2 3", "2 3", "2 3"], [1, 2, 3], num_dup=2)
    with pytest.raises(ValueError, match="max_tokens"):
        TitleIndex.build(WordTokenizer(), ["2"], [1], max_tokens=0)


def test_a_tokenizer_trained_on_a_tiny_catalogue_round_trips(tmp_path: Path) -> None:
    titles = [t for t, _ in TINY_ITEMS]
    tok = TitleTokenizer.train(titles, vocab_size=300)
    assert tok.kind == "bpe" and (tok.pad_id, tok.eos_id) == (0, 1)
    ids = tok.encode(titles)
    assert tok.decode(ids) == titles  # byte-level: exact, the empty title included
    assert all(0 not in s and 1 not in s for s in ids)
    new = ["Red Eyeliner", "Ünïcode Cream ✓"]
    assert tok.decode(tok.encode(new)) == new  # bytes never seen in training still round-trip
    back = TitleTokenizer.load(tok.save(tmp_path / "tok"))
    assert back.encode(titles) == ids and back.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        TitleTokenizer.train(titles, vocab_size=10)


def test_the_local_tokenizer_path(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    tok = TitleTokenizer.from_pretrained(model_dir)  # the tiny BERT's WordPiece, local files only
    assert tok.kind == "transformers" and tok.pad_id == 0 and tok.eos_id == 3  # [PAD], [SEP] (no eos token)
    titles = [t.lower() for t, _ in TINY_ITEMS]
    ids = tok.encode(titles)
    assert all(ids[i] for i, t in enumerate(titles) if t) and tok.decode(ids) == titles
    back = TitleTokenizer.load(tok.save(tmp_path / "copy"))
    assert back.kind == "transformers" and back.encode(titles) == ids
    index = TitleIndex.build(tok, titles, np.arange(1, len(titles) + 1))
    assert index.num_dup == 1 and index.vocab_size == tok.vocab_size + 1  # the one empty title gets dup_0
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        TitleTokenizer.from_pretrained(tmp_path / "sentence-transformers/all-MiniLM-L6-v2")


# ---- the constrained title beam -----------------------------------------------------------------------------------
TITLES = ["2 3", "2 3 4", "2 3", "", "5", "5 6 7", "", "2 8 9 10", "11", "6 6"]  # duplicates, empties, prefixes


def tiny_title_model(titles: list[str] = TITLES, seed: int = 0) -> tuple[TitleGenerator, TitleIndex, np.ndarray]:
    ids = random_ids(len(titles), seed)
    item_ids = ids.item_ids
    index = TitleIndex.build(WordTokenizer(), titles, item_ids)
    layout = ids.layout(0)
    cfg = TitleConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, title_dim=16, vocab_size=index.vocab_size,
                      pad_id=0, eos_id=1)
    torch.manual_seed(seed)
    model = TitleGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)), torch.from_numpy(index.padded_targets()))
    with torch.no_grad():  # a peaked output layer, so scores differ a lot between titles
        model.out_bias.normal_(0, 2.0)
    return model.eval(), index, ids.codes


def brute_force_scores(model: TitleGenerator, h: torch.Tensor, index: TitleIndex) -> torch.Tensor:
    """Every item's title log-probability with each token renormalised over what a dict trie allows: (B, N)."""
    seqs = [list(r[r >= 0]) + [index.eos_id] for r in index.sequences]
    trie = DictTrie([s[:-1] for s in seqs], list(range(len(seqs))), end_token=index.eos_id)
    out = torch.zeros(h.shape[0], len(seqs))
    for n, seq in enumerate(seqs):  # loop over items and positions: the obvious reference
        state, cond = model.title_start(h)
        prev = None
        for j, t in enumerate(seq):
            logits, state = model.step(prev, state, cond)
            allowed = sorted(trie.allowed(seq[:j]))
            out[:, n] += logits[:, allowed].log_softmax(-1)[:, allowed.index(t)]
            prev = torch.full((h.shape[0],), t, dtype=torch.long)
    return out


@pytest.mark.parametrize("num_beams", [3, 10])
def test_constrained_title_beam_returns_real_distinct_items_and_matches_brute_force(num_beams: int) -> None:
    model, index, codes = tiny_title_model()
    h = torch.randn(6, 16)
    with torch.no_grad():
        beams = title_beam_search(model, h, num_beams=num_beams, tree=index.tree)
        items, scores = leaf_items(beams, index.tree, 3), beams.scores[:, :3]
        ref = brute_force_scores(model, h, index)
    assert torch.isin(items, torch.from_numpy(index.item_ids)).all()
    assert all(len(set(r)) == 3 for r in items.tolist())  # distinct per user
    rows = torch.searchsorted(torch.from_numpy(index.item_ids), items)
    assert torch.allclose(scores, ref.gather(1, rows), atol=1e-5)  # a beam's score is the title's renormalised log-prob
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    if num_beams == len(TITLES):  # beams cover the catalogue: the beam's top k is the exact top k
        assert torch.equal(rows, ref.topk(3, dim=1).indices)
    dec = TitleDecoders(model, index.tree, torch.from_numpy(index.item_ids), torch.from_numpy(codes), num_beams=num_beams,
                        length_penalty=0.0)
    res = dec.decode("title-beam", h, k=3)
    assert torch.equal(res.items, items) and dec.stats.non_items == 0


def test_one_beam_is_a_greedy_walk_to_a_real_title() -> None:  # refused before the one beam loop ("max_steps")
    model, index, _ = tiny_title_model()
    h = torch.randn(5, 16)
    with torch.no_grad():
        beams = title_beam_search(model, h, num_beams=1, tree=index.tree)
        ref = brute_force_scores(model, h, index)
    items = leaf_items(beams, index.tree, 1)
    rows = torch.searchsorted(torch.from_numpy(index.item_ids), items)
    assert torch.allclose(beams.scores, ref.gather(1, rows), atol=1e-5)


def test_length_penalty_divides_by_the_length_and_never_leaves_the_tree() -> None:
    model, index, _ = tiny_title_model()
    h = torch.randn(4, 16)
    with torch.no_grad():
        plain = title_beam_search(model, h, num_beams=10, tree=index.tree)
        normed = title_beam_search(model, h, num_beams=10, tree=index.tree, length_penalty=1.0)
    items = leaf_items(normed, index.tree, 5)
    assert torch.isin(items, torch.from_numpy(index.item_ids)).all()
    assert torch.allclose(normed.scores, normed.logp / normed.lengths.float())
    assert torch.equal(plain.scores, plain.logp)


def test_free_title_beam_can_leave_the_tree_and_is_looked_up() -> None:
    model, index, _ = tiny_title_model()
    h = torch.randn(8, 16)
    with torch.no_grad():
        model.out_bias[1] += 2.0  # eos likely: beams finish at different steps
        free = title_beam_search(model, h, num_beams=5, tree=None, max_steps=6)
    assert free.finished.any() and (~free.finished).any()
    named = lookup_generated(free, index.tree)
    for b, m in torch.nonzero(free.finished).tolist():  # a finished beam stops at its first eos: pad after, no more length
        toks = free.tokens[b, m].tolist()
        first = toks.index(1)
        assert int(free.lengths[b, m]) == first + 1 and all(t == 0 for t in toks[first + 1 :])
    seqs = {tuple(list(r[r >= 0]) + [1]): int(i) for r, i in zip(index.sequences, index.item_ids, strict=True)}
    for b in range(8):
        for m in range(5):
            toks = free.tokens[b, m, : int(free.lengths[b, m])].tolist()
            expect = seqs.get(tuple(toks), -1) if bool(free.finished[b, m]) else -1
            assert int(named[b, m]) == expect
    assert (named < 0).any()  # a random model generates token sequences that are not titles


# ---- grounding ----------------------------------------------------------------------------------------------------
def test_free_titles_are_grounded_to_real_items(model_dir: Path) -> None:  # noqa: F811
    words = sorted({w.lower() for t, _ in TINY_ITEMS for w in t.split()})
    titles = [t.lower() for t, _ in TINY_ITEMS] + ["red cream", "blue spray"]
    tok = TitleTokenizer.from_pretrained(model_dir)
    ids = random_ids(len(titles), 0)
    index = TitleIndex.build(tok, titles, ids.item_ids)
    layout = ids.layout(0)
    cfg = TitleConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, title_dim=16, vocab_size=index.vocab_size,
                      pad_id=tok.pad_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    model = TitleGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)), torch.from_numpy(index.padded_targets())).eval()
    encoder = load_encoder(model_dir, "cpu")
    emb = torch.from_numpy(embed_texts(titles, encoder, progress=False))
    dec = TitleDecoders(model, index.tree, torch.from_numpy(ids.item_ids), torch.from_numpy(ids.codes), num_beams=4,
                        tokenizer=tok, encoder=encoder, item_emb=emb)
    res = dec.decode("title-grounded", torch.randn(5, 16), k=4)
    assert torch.isin(res.items, torch.from_numpy(ids.item_ids)).all()
    assert all(len(set(r)) == 4 for r in res.items.tolist())
    assert dec.stats.users == 5 and dec.stats.generations == 20 and dec.stats.ground_seconds > 0
    assert words  # the encoder's vocabulary covers the catalogue's words


def tiny_causal(seed: int = 0) -> tuple[CausalGenerator, PrefixTree, np.ndarray]:
    ids = random_ids(30, seed, sizes=(3, 4, 4))
    layout = ids.layout(0)
    torch.manual_seed(seed)
    model = CausalGenerator(CausalConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, dense_dim=0), layout,
                            torch.as_tensor(layout.codes_to_tokens(ids.codes))).eval()
    return model, PrefixTree.from_semantic_ids(ids, layout), ids.item_ids


def test_code_grounding_takes_the_longest_matching_prefix_then_the_nearest_item() -> None:
    model, _, _ = tiny_causal()
    g = CodeGrounder(model)
    item_tokens = model.item_tokens[1:]
    rng = np.random.default_rng(1)
    L = item_tokens.shape[1]
    lo = torch.tensor([model.layout.level_range(lv)[0] for lv in range(L)])
    hi = torch.tensor([model.layout.level_range(lv)[1] for lv in range(L)])
    tuples = lo + torch.from_numpy(rng.integers(0, (hi - lo).numpy(), size=(200, L)))
    tuples[:10] = item_tokens[:10]  # some tuples are items
    with torch.no_grad():
        rows, is_item = g.ground(tuples)
        vec = model.code_emb(item_tokens).sum(1)
        for t, r, was in zip(tuples, rows.tolist(), is_item.tolist(), strict=True):  # brute force per tuple
            common = (item_tokens == t).int().cumprod(1).sum(1)  # shared prefix length with every item
            best = common.max()
            assert was == bool(best == L)
            cand = torch.nonzero(common == best).view(-1)
            dist = (vec[cand] - model.code_emb(t).sum(0)).norm(dim=1)
            assert r in cand.tolist() and torch.isclose(dist.min(), (vec[r] - model.code_emb(t).sum(0)).norm())
    assert is_item[:10].all() and torch.equal(rows[:10], torch.arange(10))


def test_free_codes_are_grounded_to_real_distinct_items() -> None:
    model, tree, item_ids = tiny_causal()
    dec = GroundedCodeDecoders(model, tree, torch.from_numpy(item_ids), num_beams=12).refresh()
    res = dec.decode(CODES_GROUNDED, torch.randn(7, 16), k=10)
    assert torch.isin(res.items, torch.from_numpy(item_ids)).all()
    assert all(len(set(r)) == 10 for r in res.items.tolist())
    assert torch.all(res.scores[:, :-1] >= res.scores[:, 1:])
    s = dec.stats.as_dict()
    assert s["users"] == 7 and 0 <= s["non_item_share_beams"] <= 1 and dec.stats.non_items > 0  # random: many misses
    assert dec.decode("beam", torch.randn(2, 16), k=3).items.shape == (2, 3)  # the other decoders still serve


def test_the_grounding_cache_follows_the_encoders_files_not_its_folder_name(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """title-grounded's catalogue embeddings are cached in the run; another encoder put in the same folder (same name,
    other weights) once reused the old encoder's cache: wrong scores, or a shape error for another width."""
    import semid.embed
    from generator.runs.titles import catalogue_title_embeddings

    calls = []

    def fake_embed(titles, encoder, **kwargs):  # noqa: ANN001, ANN003 (the encoder's output: its "width" times ones)
        calls.append(encoder)
        return np.full((len(titles), encoder), 1.0, dtype=np.float32)

    monkeypatch.setattr(semid.embed, "embed_texts", fake_embed)
    run, enc = tmp_path / "run", tmp_path / "Tiny-BERT"
    run.mkdir()
    enc.mkdir()
    (enc / "config.json").write_text('{"hidden_size": 4}')
    (enc / "model.safetensors").write_bytes(b"weights A")
    titles = ["a lipstick", "a brush", "a cream"]
    assert catalogue_title_embeddings(run, titles, 4, enc).shape == (3, 4)
    assert catalogue_title_embeddings(run, titles, 4, enc).shape == (3, 4) and calls == [4]  # cached
    (enc / "model.safetensors").write_bytes(b"weights B")  # another model, same folder name
    (enc / "config.json").write_text('{"hidden_size": 6}')
    assert catalogue_title_embeddings(run, titles, 6, enc).shape == (3, 6) and calls == [4, 6]
    assert catalogue_title_embeddings(run, titles[:2], 6, enc).shape == (2, 6) and calls == [4, 6, 6]  # other titles


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_the_title_loss_is_each_tokens_smoothed_cross_entropy_summed_over_the_title(eps: float) -> None:
    model, index, _ = tiny_title_model()
    h = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([1, 3, 5, 7])  # "2 3 4", "" (eos alone), "5 6 7", "2 8 9 10"
    seqs = [list(r[r >= 0]) + [index.eos_id] for r in index.sequences]
    want = torch.zeros(4)
    for b, row in enumerate(rows.tolist()):  # loop over titles and tokens: the hand computation
        state, cond = model.title_start(h[b : b + 1])
        prev = None
        for t in seqs[row]:
            logits, state = model.step(prev, state, cond)
            logp = logits[0].log_softmax(-1)
            want[b] -= (1 - eps) * logp[t] + eps * logp.mean()
            prev = torch.tensor([t])
    got = model.title_nll(h, rows, label_smoothing=eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_title_run_defaults_to_no_label_smoothing_and_applies_a_given_one() -> None:
    from generator.runs.options import TrainOptions

    assert TrainOptions(target="title").optim().label_smoothing == 0.0
    assert TrainOptions(target="title", label_smoothing=0.1).optim().label_smoothing == 0.1
    assert TrainOptions().optim().label_smoothing == 0.1  # the causal code head's sibling smoothing
