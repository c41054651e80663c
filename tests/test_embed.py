"""semid embed: mean-pooled, L2-normalised embeddings from a tiny random BERT saved to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from semid.data import load_dataset
from semid.embed import default_name, embed_dataset, embed_texts, load_encoder
from semid_cli import main
from tests.conftest import TINY_ITEMS

HIDDEN = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer BERT (hidden 16) and a tokenizer over the tiny catalogue's words."""
    folder = tmp_path_factory.mktemp("models") / "Tiny-BERT"
    folder.mkdir()
    words = sorted({w.lower() for title, attrs in TINY_ITEMS for w in " ".join([title, *attrs]).split()})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words]) + "\n")
    # transformers 5 takes the vocabulary as `vocab=` (a `vocab_file=` argument is silently ignored: all [UNK])
    BertTokenizer(vocab=str(vocab), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab.read_text().split()),
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_embed_dataset_writes_unit_rows_in_item_order(tiny_dataset_dir: Path, model_dir: Path) -> None:
    result = embed_dataset(tiny_dataset_dir, model_dir, batch_size=4, progress=False)
    assert result.path == tiny_dataset_dir / "item_emb_tiny_bert.npy"
    assert (result.num_items, result.dim) == (len(TINY_ITEMS), HIDDEN)
    emb = load_dataset(tiny_dataset_dir).embeddings("tiny_bert")  # the dataset loader accepts it
    assert emb.dtype == np.float32 and emb.shape == (len(TINY_ITEMS), HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # batching (sorted by length, padded) gives the rows that one text at a time gives, in item order
    encoder = load_encoder(model_dir, "cpu")
    texts = load_dataset(tiny_dataset_dir).catalogue.texts()
    one_by_one = np.concatenate([embed_texts([t], encoder, progress=False) for t in texts])
    np.testing.assert_allclose(emb, one_by_one, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_mean_pooling_over_real_tokens_only(model_dir: Path) -> None:
    encoder = load_encoder(model_dir, "cpu")
    text = "red lipstick. acme, makeup"
    batch = encoder.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state[0]  # (T, D), no padding
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
    got = embed_texts([text, "face cream " * 8], encoder, progress=False)  # padded next to a longer text
    np.testing.assert_allclose(got[0], expected, atol=1e-5)


def test_a_text_longer_than_the_model_reads_is_cut_at_its_positions(model_dir: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    encoder = load_encoder(model_dir, "cpu")  # 64 positions; the default max_length is 256
    text = "red lipstick " * 100
    with caplog.at_level("WARNING"):
        got = embed_texts([text], encoder, progress=False)  # (the model failed: tensor sizes 202 and 64)
    assert "`max_length` 256 is more than this model reads (64 positions)" in caplog.text
    np.testing.assert_allclose(got, embed_texts([text], encoder, max_length=64, progress=False), atol=1e-6)


def test_fields_and_name(tiny_dataset_dir: Path, model_dir: Path) -> None:
    titles = embed_dataset(tiny_dataset_dir, model_dir, fields=["title"], name="titles", progress=False)
    assert titles.path.name == "item_emb_titles.npy"
    with pytest.raises(
        ValueError, match=r"`fields` must be a non-empty list of \['title', 'attributes'\], got \['price'\]"
    ):
        embed_dataset(tiny_dataset_dir, model_dir, fields=["price"], progress=False)
    for bad in ("../x", "t7\n"):  # ("$" matched before a final newline: a file `item_emb_t7\n.npy` was written)
        with pytest.raises(ValueError, match=r"`name` must be letters"):
            embed_dataset(tiny_dataset_dir, model_dir, name=bad, progress=False)
    assert not list(tiny_dataset_dir.glob("item_emb_t7*"))
    assert default_name("/m/all-MiniLM-L6-v2") == "all_minilm_l6_v2"
    before = titles.path.read_bytes()  # an existing file (codebooks may come from it): replaced only when asked
    with pytest.raises(FileExistsError, match="item_emb_titles.npy: already exists.*--overwrite"):
        embed_dataset(tiny_dataset_dir, model_dir, fields=["title", "attributes"], name="titles", progress=False)
    assert titles.path.read_bytes() == before
    again = embed_dataset(tiny_dataset_dir, model_dir, fields=["title", "attributes"], name="titles", progress=False,
                          overwrite=True)
    assert again.path.read_bytes() != before


def test_missing_or_invalid_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model folder here"):
        load_encoder(tmp_path / "sentence-transformers/all-MiniLM-L6-v2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_encoder(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="cannot load a tokenizer and model"):
        load_encoder(tmp_path / "broken")


def test_cli(tiny_dataset_dir: Path, model_dir: Path, capsys) -> None:
    argv = [
        "embed",
        "--data",
        str(tiny_dataset_dir),
        "--model",
        str(model_dir),
        "--name",
        "cli",
        "--no-progress",
    ]
    assert main([*argv, "--batch-size", "2"]) == 0
    assert "item_emb_cli.npy" in capsys.readouterr().out
    assert np.load(tiny_dataset_dir / "item_emb_cli.npy").shape == (len(TINY_ITEMS), HIDDEN)
    assert main(["embed", "--data", str(tiny_dataset_dir), "--model", str(tiny_dataset_dir / "nope")]) == 2
    assert "no model folder here" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "2"]) == 2  # the file exists now: not replaced without --overwrite
    assert "item_emb_cli.npy: already exists" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "0", "--overwrite"]) == 2
    assert "`--batch-size` must be a positive int, got 0" in capsys.readouterr().err
    # checked before the model is read (it was after loading the model and the dataset)
    assert main(["embed", "--data", str(tiny_dataset_dir), "--model", str(tiny_dataset_dir / "nope"), "--max-length", "1"]) == 2
    assert "`--max-length` must be an int >= 2, got 1" in capsys.readouterr().err
    assert main([*argv, "--device", "foo", "--overwrite"]) == 2  # a clear error, not torch's traceback
    assert "`--device` must be a torch device" in capsys.readouterr().err


def test_models_that_cannot_embed_are_refused_at_load_naming_the_folder(model_dir: Path, tmp_path: Path) -> None:
    """They failed in the first forward pass: a tokenizer of another model with a raw ``IndexError``, a GPT-2-like
    folder with transformers' advice to call ``add_special_tokens``, a T5 folder with "You must specify exactly one
    of input_ids or inputs_embeds" (a helper's audit)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast, T5Config, T5Model

    small = BertTokenizer.from_pretrained(model_dir)
    mismatched = tmp_path / "mismatched"  # the tokenizer's ids run past the model's 4 rows
    small.save_pretrained(mismatched)
    BertModel(BertConfig(vocab_size=4, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(mismatched)
    with pytest.raises(ValueError, match=rf"{mismatched}: its tokenizer has \d+ tokens but the model embeds 4"):
        load_encoder(mismatched, "cpu")
    no_pad = tmp_path / "gpt2-like"
    words = Tokenizer(WordLevel({w: i for i, w in enumerate(small.get_vocab())}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(no_pad)
    GPT2Model(GPT2Config(vocab_size=len(small), n_embd=HIDDEN, n_layer=1, n_head=2)).save_pretrained(no_pad)
    with pytest.raises(ValueError, match=rf"{no_pad}: its tokenizer has no pad token"):
        load_encoder(no_pad, "cpu")
    seq2seq = tmp_path / "t5-like"
    small.save_pretrained(seq2seq)
    T5Model(T5Config(vocab_size=len(small), d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(seq2seq)
    with pytest.raises(ValueError, match=rf"{seq2seq}: an encoder-decoder model \(t5\)"):
        load_encoder(seq2seq, "cpu")
    assert load_encoder(model_dir, "cpu").path == model_dir  # the tiny BERT still loads
