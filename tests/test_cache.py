"""The latent / text-embedding cache: hit, miss, invalidation, atomic storage, and zero encoder calls on a rerun.

The encoders here are small counting functions with the real shapes' structure (a 16x pooling for the VAE, a
hash-seeded tensor per prompt for the text encoder): they test the cache, which never sees a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from klein_core.atomic import PARTIAL_SUFFIX
from klein_core.data.buckets import Bucket
from klein_core.data.cache import (
    CACHE_ENV_VAR,
    CacheError,
    EmbeddingCache,
    default_cache_dir,
    latent_requests,
    prompts_to_cache,
)
from klein_core.data.scan import scan_dataset
from klein_core.data.spec import DatasetSpec
from klein_core.tools.sample_data import make_sample_dataset

TRIGGER = "kleinchar"
MODEL = "tiny-klein:weights=abc123:te-layers=9,18,27"


class CountingImageEncoder:
    """Pools pixels 16x16 (like the VAE+patchify's /16) and counts how many images it was asked to encode."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "encoders must run without autograd"
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        self.calls += 1
        self.images += pixels.shape[0]
        self.shapes.append(tuple(pixels.shape))
        return torch.nn.functional.avg_pool2d(pixels, 16).to(torch.bfloat16)


class CountingTextEncoder:
    def __init__(self) -> None:
        self.calls = 0
        self.prompts: list[str] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.calls += 1
        self.prompts.extend(prompts)
        rows = []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
            rows.append(torch.randn(8, 6, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    make_sample_dataset(folder, count=5, size=256)
    return folder


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "klein-lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "klein-lora"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert EmbeddingCache(model_identity=MODEL).cache_dir == tmp_path / "env"


def test_a_second_run_on_an_unchanged_dataset_calls_no_encoder(dataset: Path, tmp_path: Path):
    spec = DatasetSpec(str(dataset), TRIGGER, resolutions=(128, 64))
    scan = spec.scan()
    prompts = prompts_to_cache(scan, spec, preview_prompts=["[trigger] riding a bike"])
    first = EmbeddingCache(tmp_path / "cache", MODEL)
    image_encoder, text_encoder = CountingImageEncoder(), CountingTextEncoder()
    latents = first.get_or_compute_latents(latent_requests(scan), image_encoder)
    texts = first.get_or_compute_text(prompts, text_encoder)
    assert image_encoder.images == 10 and first.stats.latent_misses == 10  # 5 images x 2 resolutions
    assert text_encoder.prompts == prompts and first.stats.text_misses == len(prompts)

    rerun_scan = DatasetSpec(str(dataset), TRIGGER, resolutions=(128, 64)).scan()
    second = EmbeddingCache(tmp_path / "cache", MODEL)
    image_again, text_again = CountingImageEncoder(), CountingTextEncoder()
    latents_again = second.get_or_compute_latents(latent_requests(rerun_scan), image_again)
    rerun_prompts = prompts_to_cache(rerun_scan, spec, ["[trigger] riding a bike"])
    texts_again = second.get_or_compute_text(rerun_prompts, text_again)
    assert (image_again.calls, text_again.calls) == (0, 0)
    assert (second.stats.latent_hits, second.stats.text_hits, second.stats.misses) == (10, len(prompts), 0)
    for a, b in zip(latents + texts, latents_again + texts_again):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_latents_come_from_the_bucket_fitted_pixels_in_one_bucket_batches(dataset: Path, tmp_path: Path):
    scan = scan_dataset(dataset, TRIGGER, resolutions=(128,))
    encoder = CountingImageEncoder()
    cache = EmbeddingCache(tmp_path / "cache", MODEL, batch_size=8)
    latents = cache.get_or_compute_latents(latent_requests(scan), encoder)
    for item, latent in zip(scan.items, latents):
        bucket = item.bucket(128)
        assert tuple(latent.shape) == (3, bucket.height // 16, bucket.width // 16)
        assert latent.dtype == torch.bfloat16
    assert sorted(encoder.shapes) == sorted(
        (n, 3, b.height, b.width) for b, n in scan.bucket_counts(128).items()
    )  # one encoder call per bucket, never mixing sizes


def test_changing_an_image_recomputes_only_that_image(dataset: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    scan = scan_dataset(dataset, TRIGGER, resolutions=(64,))
    EmbeddingCache(cache_dir, MODEL).get_or_compute_latents(latent_requests(scan), CountingImageEncoder())
    Image.open(dataset / "sample_00.png").rotate(180).save(dataset / "sample_00.png")
    changed = scan_dataset(dataset, TRIGGER, resolutions=(64,))
    encoder, cache = CountingImageEncoder(), EmbeddingCache(cache_dir, MODEL)
    cache.get_or_compute_latents(latent_requests(changed), encoder)
    assert encoder.images == 1 and (cache.stats.latent_hits, cache.stats.latent_misses) == (4, 1)


def test_changing_a_caption_recomputes_only_that_caption(dataset: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    spec = DatasetSpec(str(dataset), TRIGGER, resolutions=(64,))
    EmbeddingCache(cache_dir, MODEL).get_or_compute_text(prompts_to_cache(spec.scan(), spec), CountingTextEncoder())
    (dataset / "sample_01.txt").write_text("photo of [trigger], sitting on a chair", encoding="utf-8")
    encoder, cache = CountingTextEncoder(), EmbeddingCache(cache_dir, MODEL)
    cache.get_or_compute_text(prompts_to_cache(spec.scan(), spec), encoder)
    assert encoder.prompts == ["photo of kleinchar, sitting on a chair"]


def test_changing_the_bucket_or_the_model_identity_misses(dataset: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    scan = scan_dataset(dataset, TRIGGER, resolutions=(64,))
    EmbeddingCache(cache_dir, MODEL).get_or_compute_latents(latent_requests(scan), CountingImageEncoder())
    EmbeddingCache(cache_dir, MODEL).get_or_compute_text(["photo of kleinchar"], CountingTextEncoder())

    other_resolution = scan_dataset(dataset, TRIGGER, resolutions=(128,))
    encoder = CountingImageEncoder()
    EmbeddingCache(cache_dir, MODEL).get_or_compute_latents(latent_requests(other_resolution), encoder)
    assert encoder.images == 5

    other_model = EmbeddingCache(cache_dir, MODEL + ":fp8")
    image_encoder, text_encoder = CountingImageEncoder(), CountingTextEncoder()
    other_model.get_or_compute_latents(latent_requests(scan), image_encoder)
    other_model.get_or_compute_text(["photo of kleinchar"], text_encoder)
    assert (image_encoder.images, text_encoder.calls) == (5, 1)


def test_keys_depend_on_exactly_their_inputs(tmp_path: Path):
    cache = EmbeddingCache(tmp_path, MODEL)
    same = cache.latent_key("ab" * 32, Bucket(64, 64))
    assert same == EmbeddingCache(tmp_path / "elsewhere", MODEL).latent_key("ab" * 32, (64, 64))
    assert len({same, cache.latent_key("cd" * 32, (64, 64)), cache.latent_key("ab" * 32, (80, 48))}) == 3
    assert cache.text_key("photo of x") != cache.text_key("photo of x ")
    assert cache.text_key("photo of x") != EmbeddingCache(tmp_path, MODEL + "2").text_key("photo of x")


def test_repeated_prompts_are_encoded_once_and_returned_in_order(tmp_path: Path):
    encoder, cache = CountingTextEncoder(), EmbeddingCache(tmp_path, MODEL, batch_size=2)
    out = cache.get_or_compute_text(["a", "b", "a", "", "c", "b"], encoder)
    assert encoder.prompts == ["a", "b", "", "c"] and encoder.calls == 2
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[5]) and not torch.equal(out[0], out[1])


def test_entries_are_whole_safetensors_files_and_no_partial_file_is_left(dataset: Path, tmp_path: Path):
    from safetensors import safe_open

    cache_dir = tmp_path / "cache"
    scan = scan_dataset(dataset, TRIGGER, resolutions=(64,))
    cache = EmbeddingCache(cache_dir, MODEL)
    cache.get_or_compute_latents(latent_requests(scan), CountingImageEncoder())
    cache.get_or_compute_text(["photo of kleinchar"], CountingTextEncoder())
    files = sorted(cache_dir.rglob("*"))
    assert not [f for f in files if f.name.endswith(PARTIAL_SUFFIX)]
    entries = [f for f in files if f.suffix == ".safetensors"]
    assert len(entries) == 6
    text_entry = cache.entry_path("text", cache.text_key("photo of kleinchar"))
    with safe_open(str(text_entry), framework="pt") as handle:
        assert '"prompt": "photo of kleinchar"' in handle.metadata()["inputs"]


def test_a_failing_encoder_leaves_no_entry_and_the_next_run_recomputes(tmp_path: Path):
    def broken(prompts: list[str]) -> torch.Tensor:
        raise RuntimeError("out of memory")

    cache = EmbeddingCache(tmp_path, MODEL)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get_or_compute_text(["photo of kleinchar"], broken)
    assert not list(tmp_path.rglob("*.safetensors"))
    encoder = CountingTextEncoder()
    EmbeddingCache(tmp_path, MODEL).get_or_compute_text(["photo of kleinchar"], encoder)
    assert encoder.calls == 1


def test_a_damaged_entry_is_recomputed_and_replaced(tmp_path: Path):
    cache = EmbeddingCache(tmp_path, MODEL)
    good = cache.get_or_compute_text(["photo of kleinchar"], CountingTextEncoder())[0]
    entry = cache.entry_path("text", cache.text_key("photo of kleinchar"))
    entry.write_bytes(entry.read_bytes()[:40])
    encoder, again = CountingTextEncoder(), EmbeddingCache(tmp_path, MODEL)
    assert torch.equal(again.get_or_compute_text(["photo of kleinchar"], encoder)[0], good)
    assert encoder.calls == 1
    assert torch.equal(EmbeddingCache(tmp_path, MODEL).get_or_compute_text(["photo of kleinchar"], encoder)[0], good)
    assert encoder.calls == 1


def test_an_encoder_returning_the_wrong_batch_is_an_error(tmp_path: Path):
    with pytest.raises(CacheError, match=r"returned \(1, 4\) for a batch of 2"):
        EmbeddingCache(tmp_path, MODEL).get_or_compute_text(["a", "b"], lambda prompts: torch.zeros(1, 4))
    with pytest.raises(CacheError, match="model identity"):
        EmbeddingCache(tmp_path, " ")


def test_prompts_to_cache_lists_captions_dropped_caption_negative_and_previews(dataset: Path):
    spec = DatasetSpec(str(dataset), TRIGGER, resolutions=(64,))
    scan = spec.scan()
    captions = [i.caption for i in scan.items]
    prompts = prompts_to_cache(scan, spec, ["[trigger] at the beach", captions[0]])
    assert prompts == list(dict.fromkeys(captions)) + [TRIGGER, "", "kleinchar at the beach"]
    empty_mode = spec.with_changes(dropout_caption="empty")
    assert prompts_to_cache(scan, empty_mode)[-1] == ""
    assert prompts_to_cache(scan, spec.with_changes(caption_dropout=0.0)) == list(dict.fromkeys(captions)) + [""]


def test_caching_never_writes_into_the_dataset_folder(dataset: Path, tmp_path: Path):
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    spec = DatasetSpec(str(dataset), TRIGGER, resolutions=(64,))
    cache = EmbeddingCache(tmp_path / "cache", MODEL)
    cache.get_or_compute_latents(latent_requests(spec.scan()), CountingImageEncoder())
    cache.get_or_compute_text(prompts_to_cache(spec.scan(), spec), CountingTextEncoder())
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before
