import numpy as np
import pytest
import torch

from semid.layout import TokenLayout


def test_offsets_and_vocab():
    layout = TokenLayout(codebook_sizes=(4, 3, 2), num_user_tokens=5)
    assert layout.level_offsets == (3, 7, 10)
    assert layout.user_offset == 12
    assert layout.vocab_size == 17
    assert layout.level_range(1) == (7, 10)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_codes_tokens_round_trip(kind):
    layout = TokenLayout(codebook_sizes=(4, 3, 2), num_user_tokens=0)
    codes = np.array([[0, 0, 0], [3, 2, 1], [1, 1, 0]])
    if kind == "torch":
        codes = torch.from_numpy(codes)
    tokens = layout.codes_to_tokens(codes)
    assert type(tokens) is type(codes)
    assert tokens.tolist() == [[3, 7, 10], [6, 9, 11], [4, 8, 10]]
    assert layout.tokens_to_codes(tokens).tolist() == codes.tolist()


def test_out_of_range_codes_and_tokens_are_errors():
    layout = TokenLayout(codebook_sizes=(4, 3))
    with pytest.raises(ValueError, match=r"level 1 takes codes in \[0, 3\), got 3"):
        layout.codes_to_tokens(np.array([[0, 3]]))
    with pytest.raises(ValueError, match="not in level 0's block"):
        layout.tokens_to_codes(np.array([[8, 8]]))
    with pytest.raises(ValueError, match="must have 2 levels"):
        layout.codes_to_tokens(np.array([[0, 1, 2]]))


def test_user_tokens_are_stable_and_in_range():
    layout = TokenLayout(codebook_sizes=(4,), num_user_tokens=7)
    users = np.arange(1000)
    tok = layout.user_tokens(users)
    assert tok.min() >= layout.user_offset and tok.max() < layout.vocab_size
    assert len(np.unique(tok)) == 7  # all buckets used
    # pinned values: a change of hash would silently re-bucket every user of every saved checkpoint
    big = TokenLayout(codebook_sizes=(4,), num_user_tokens=2000)
    buckets = big.user_tokens(np.array([1, 2, 3, 5_000_000_000, 2**62])) - big.user_offset
    assert buckets.tolist() == [1761, 226, 1987, 832, 0]
    assert layout.user_tokens(torch.tensor([12345])).item() == layout.user_tokens(np.array([12345]))[0]
    for narrow in (np.array([1, 2, 3], dtype=np.int32), torch.tensor([1, 2, 3], dtype=torch.int32), np.array([1, 2, 3], dtype=np.uint16)):
        assert (np.asarray(big.user_tokens(narrow)) - big.user_offset).tolist() == [1761, 226, 1987]  # (int32 overflowed)


@pytest.mark.parametrize("bad", [(), (0, 4), (4, -1)])
def test_bad_codebook_sizes(bad):
    with pytest.raises(ValueError, match="codebook_sizes"):
        TokenLayout(codebook_sizes=bad)


def test_dict_round_trip():
    layout = TokenLayout(codebook_sizes=(4, 3), num_user_tokens=9)
    assert TokenLayout.from_dict(layout.to_dict()) == layout
