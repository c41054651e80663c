"""rqvae: both methods through one interface (fit -> codes -> SemanticIDs, encode, decode, save/load), the
balanced last level, determinism and the argument errors. Tiny data only (300 x 16, codebooks of 8)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from rqvae import (
    RQVAE,
    FitResult,
    ResidualKMeans,
    RQKMeansConfig,
    RQVAEConfig,
    code_stats,
    fit_codebooks,
    load_quantizer,
)
from semid import SemanticIDs

METHODS = ("rqvae", "rqkmeans")
N, D, K, L = 300, 16, 8, 2


def clustered(n: int = N, d: int = D, seed: int = 0, duplicates: int = 20) -> np.ndarray:
    """float32 (n, d): 6 tight clusters, and ``duplicates`` rows that repeat other rows exactly."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d)) * 3
    x = centres[rng.integers(0, 6, n)] + rng.standard_normal((n, d))
    x[n - duplicates :] = x[:duplicates]
    return x.astype(np.float32)


def config(method: str, **kw: object) -> RQVAEConfig | RQKMeansConfig:
    """A small, fast config of either method."""
    kw = {"levels": L, "codebook_size": K, **kw}
    if method == "rqvae":
        small = {"hidden_dims": (32,), "latent_dim": 8, "batch_size": 64, "max_epochs": 4, "kmeans_iters": 5}
        return RQVAEConfig(**{**small, **kw})
    return RQKMeansConfig(**{"max_iter": 50, **kw})


def method_of(fitted: FitResult) -> str:
    return "rqvae" if isinstance(fitted.quantizer, RQVAE) else "rqkmeans"


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered()


@pytest.fixture(scope="module", params=METHODS)
def fitted(request: pytest.FixtureRequest, data: np.ndarray) -> FitResult:
    return fit_codebooks(data, config(request.param), progress=False)


# ---- round trips ---------------------------------------------------------------------------------------------------
def test_fit_codes_make_semantic_ids(fitted: FitResult, data: np.ndarray) -> None:
    codes = fitted.codes
    assert codes.shape == (N, L) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < K
    ids = SemanticIDs.from_codes(codes, [K] * L, extra_level_size=N)
    np.testing.assert_array_equal(ids.items_of(ids.codes), np.arange(1, N + 1))
    collisions = ids.collision_stats()
    assert fitted.stats.items_colliding == collisions.items_colliding
    assert fitted.stats.largest_group == collisions.largest_group
    assert fitted.seconds > 0
    assert not torch.are_deterministic_algorithms_enabled()  # the fit's deterministic mode does not leak out
    assert [lvl.codebook_size for lvl in fitted.stats.levels] == [K] * L


def test_encode_matches_fit_codes_and_codes_new_items(fitted: FitResult, data: np.ndarray) -> None:
    np.testing.assert_array_equal(
        fitted.quantizer.encode(data), fitted.codes
    )  # plain assignment: the same codes
    new = clustered(seed=1)[:7]
    codes = fitted.quantizer.encode(new)
    assert codes.shape == (7, L) and codes.dtype == np.int64 and codes.max() < K
    assert fitted.quantizer.encode(torch.from_numpy(new)).tolist() == codes.tolist()  # a tensor works too


def test_decode_reconstructs_in_input_space(fitted: FitResult, data: np.ndarray) -> None:
    recon = fitted.quantizer.decode(fitted.codes)
    assert recon.shape == data.shape
    assert ((data - recon) ** 2).sum() < ((data - data.mean(0)) ** 2).sum()  # better than the mean
    assert 0 < fitted.stats.reconstruction_rel < 1


def test_save_load_with_weights_only_gives_identical_encode(
    fitted: FitResult, data: np.ndarray, tmp_path
) -> None:
    path = tmp_path / "quantizer.pt"
    fitted.quantizer.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "rqvae.quantizer" and raw["method"] in METHODS
    loaded = load_quantizer(path)
    assert type(loaded) is type(fitted.quantizer)
    np.testing.assert_array_equal(loaded.encode(data), fitted.quantizer.encode(data))
    np.testing.assert_allclose(loaded.decode(fitted.codes), fitted.quantizer.decode(fitted.codes), rtol=1e-6)
    other = RQVAE if isinstance(loaded, ResidualKMeans) else ResidualKMeans
    with pytest.raises(ValueError, match="quantizer, not"):
        other.load(path)
    bare = tmp_path / "bare.pt"  # a bare pickle (or any other file) is refused by its first bytes, never unpickled
    bare.write_bytes(pickle.dumps({"format": "rqvae.quantizer"}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does torch get to warn about its pickle protocol
        with pytest.raises(ValueError, match=r"bare.pt: not a quantizer file \(one is a zip that torch.save writes"):
            load_quantizer(bare)


# ---- determinism and balance ---------------------------------------------------------------------------------------
def test_same_seed_same_codes(fitted: FitResult, data: np.ndarray) -> None:
    method = method_of(fitted)
    again = fit_codebooks(data, config(method), progress=False)
    np.testing.assert_array_equal(again.codes, fitted.codes)
    if method == "rqvae":
        for (name, a), b in zip(
            fitted.quantizer.state_dict().items(), again.quantizer.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


def test_balanced_last_level_removes_collisions(fitted: FitResult, data: np.ndarray) -> None:
    method = method_of(fitted)
    balanced = fit_codebooks(data, config(method, balanced=True), progress=False)
    assert fitted.stats.items_colliding >= 40  # the 20 duplicated rows collide with their originals
    prefix_groups = np.unique(balanced.codes[:, :-1], axis=0, return_counts=True)[1]
    if prefix_groups.max() <= K:
        assert balanced.stats.items_colliding == 0
    assert balanced.stats.items_colliding < fitted.stats.items_colliding
    np.testing.assert_array_equal(
        balanced.codes[:, :-1], balanced.quantizer.encode(data)[:, :-1]
    )  # prefixes kept
    # cold start: new items still get (nearest) codes
    assert balanced.quantizer.encode(data[:3]).shape == (3, L)


def test_fit_limits_threads_and_restores_them(data: np.ndarray) -> None:
    before = torch.get_num_threads()
    seen = []
    original = ResidualKMeans._fit

    def spy(self: ResidualKMeans, x: np.ndarray) -> None:
        seen.append(torch.get_num_threads())
        original(self, x)

    ResidualKMeans._fit = spy  # type: ignore[method-assign]
    try:
        fit_codebooks(data, config("rqkmeans", num_threads=1))
    finally:
        ResidualKMeans._fit = original  # type: ignore[method-assign]
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"`num_threads` must be an int > 0, got 0"):
        config("rqvae", num_threads=0)


def test_stats_match_a_direct_count() -> None:
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [2, 2]])
    s = code_stats(codes, 4)
    assert [lvl.codes_used for lvl in s.levels] == [3, 3]
    assert (s.items_colliding, s.largest_group) == (3, 3)
    p = np.array([3, 1, 1]) / 5
    assert s.levels[0].perplexity == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert np.isnan(s.reconstruction_mse)


# ---- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"codebook_size": 1}, r"`codebook_size` must be an int >= 2, got 1"),
        ({"levels": 0}, r"`levels` must be an int >= 1, got 0"),
        ({"levels": 2.5}, r"`levels` must be an int >= 1, got 2.5"),
    ],
)
def test_bad_config_is_a_clear_error(method: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(method, **kwargs)


@pytest.mark.parametrize(("method", "kwargs", "match"), [
    ("rqvae", {"balanced": "no"}, r"`balanced` must be a bool, got 'no'"),
    ("rqkmeans", {"balanced": "no"}, r"`balanced` must be a bool, got 'no'"),
    ("rqkmeans", {"seed": 2**32 - 1}, r"`seed` must be below 2\^32 - levels"),  # (level l's k-means: seed + l)
])
def test_bool_options_and_the_seed_range_are_checked(method: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(method, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_numpy_scalar_options_are_kept_as_python_values_and_the_file_loads(method: str, data: np.ndarray,
                                                                         tmp_path: Path) -> None:
    """numpy's scalars (from an array or a sweep) are accepted and kept as Python's: a quantizer file that holds them
    would not load (``weights_only``)."""
    numpy_kw = {"seed": np.int64(3), "balanced": np.bool_(False), "codebook_size": np.int64(K)}
    numpy_kw |= ({"lr": np.float64(1e-3), "latent_dim": np.int64(8), "hidden_dims": (np.int64(32),)} if method == "rqvae"
                 else {"fit_sample": np.int64(200), "tol": np.float64(1e-4)})
    cfg = config(method, **numpy_kw)
    assert all(type(v) in (int, float, bool, str, type(None), tuple) for v in vars(cfg).values())
    assert all(type(h) is int for h in getattr(cfg, "hidden_dims", ()))
    res = fit_codebooks(data, cfg, progress=False)
    res.quantizer.save(tmp_path / "q.pt")
    np.testing.assert_array_equal(load_quantizer(tmp_path / "q.pt").encode(data), res.quantizer.encode(data))


def _bad(kind: str) -> tuple[np.ndarray, str]:
    x = clustered(n=40)
    if kind == "nan":
        x[17, 3] = np.nan
        return x, r"`embeddings` row 17 is not finite"
    if kind == "inf":
        x[5, 0] = np.inf
        return x, r"`embeddings` row 5 is not finite"
    if kind == "1d":
        return x[0], r"`embeddings` must be a 2-D array \(N, D\), got shape \(16,\)"
    return x[:5], r"`embeddings` has 5 rows, fewer than `codebook_size` = 8"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["nan", "inf", "1d", "few"])
def test_bad_embeddings_are_a_clear_error(method: str, kind: str) -> None:
    x, match = _bad(kind)
    with pytest.raises(ValueError, match=match):
        fit_codebooks(x, config(method), progress=False)


def test_residual_kmeans_checks_inputs_itself() -> None:
    x, match = _bad("nan")
    with pytest.raises(ValueError, match=match):
        ResidualKMeans(levels=L, codebook_size=K).fit(x)
    with pytest.raises(ValueError, match=r"`codebook_size` must be an int >= 2, got 1"):
        ResidualKMeans(codebook_size=1).fit(clustered())


def test_encode_checks_fitted_and_dimension(fitted: FitResult) -> None:
    with pytest.raises(ValueError, match=r"must have D = 16 columns .* got 3"):
        fitted.quantizer.encode(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"`codes` must lie in \[0, 8\)"):
        fitted.quantizer.decode(np.full((2, L), K))
    with pytest.raises(NotFittedError):
        ResidualKMeans().encode(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        RQVAE(RQVAEConfig(), 3).encode(np.zeros((2, 3)))


def test_config_type_is_checked(data: np.ndarray) -> None:
    with pytest.raises(TypeError, match="`config` must be an RQVAEConfig or an RQKMeansConfig"):
        fit_codebooks(data, {"levels": 2})  # type: ignore[arg-type]


def test_rqvae_imports_neither_semid_nor_generator_and_model_not_lightning() -> None:
    code = (
        "import sys, rqvae.model; assert 'lightning' not in sys.modules, 'model.py pulled in lightning'; "
        "import rqvae; bad = [m for m in sys.modules if m.split('.')[0] in ('semid', 'generator')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rqvae_stops_early_on_reconstruction(data: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config("rqvae", max_epochs=50, patience=1, min_delta=1e3)  # no epoch can improve by 1000
    with caplog.at_level("INFO", logger="rqvae.system"):
        fit_codebooks(data, cfg, progress=False)
    assert "rqvae: 2 epochs" in caplog.text


def test_standardisation_and_the_relative_error_do_not_depend_on_the_embeddings_scale() -> None:
    from rqvae._checks import standardization
    from rqvae.stats import code_stats

    x = clustered(seed=2)[:200].astype(np.float64)
    for scale in (1.0, 1e-18):  # (an absolute 1e-12 floor called every 1e-18-scaled dimension constant)
        mean, std = standardization((x * scale).astype(np.float32))
        np.testing.assert_allclose(std / scale, standardization(x.astype(np.float32))[1], rtol=1e-4)
    recon = x + 0.1 * np.random.default_rng(0).standard_normal(x.shape)
    codes = np.zeros((len(x), 2), dtype=np.int64)
    rel = code_stats(codes, 4, embeddings=x, reconstruction=recon).reconstruction_rel
    assert 0 < rel < 1 and code_stats(codes, 4, embeddings=x * 1e-9, reconstruction=recon * 1e-9).reconstruction_rel == pytest.approx(rel)
