"""Likeness backends on real public-domain photos shipped inside PyPI packages (tests/public_photos.py).

The same face under crop, scale and colour jitter must score above a different face. Face tests need the
``[likeness]`` extra (face-recognition-models + dlib-bin) and skip, saying so, without it; the generic fallback
tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest
from public_photos import astronaut, grace_hopper, jitter, needs_face
from skimage import data

from klein_core.health.likeness import (
    FACE_LABEL,
    GENERIC_LABEL,
    FaceLikeness,
    ImageSimilarityLikeness,
    LikenessBackend,
    choose_backend,
)


@pytest.fixture(scope="module")
def face_backend() -> FaceLikeness:
    return FaceLikeness()


def jittered_astronauts() -> list[np.ndarray]:
    img = astronaut()
    return [
        jitter(img, (60, 20, 420, 400), 0.8, (1.1, 0.95, 0.85), 0.04),
        jitter(img, (0, 0, 400, 512), 1.2, (0.9, 1.0, 1.15), -0.05),
    ]


def jittered_grace_hoppers() -> list[np.ndarray]:
    img = grace_hopper()
    return [
        jitter(img, (40, 60, 480, 560), 1.3, (0.9, 1.05, 1.1), -0.03),
        jitter(img, (0, 0, 512, 450), 0.7, (1.1, 1.0, 0.9), 0.05),
    ]


def assert_same_face_beats_different_face(backend: LikenessBackend) -> None:
    for reference, same_variants, other in (
        (astronaut(), jittered_astronauts(), grace_hopper()),
        (grace_hopper(), jittered_grace_hoppers(), astronaut()),
    ):
        different = backend.score([other], [reference])
        for variant in same_variants:
            same = backend.score([variant], [reference])
            assert same > different, (backend.label, same, different)


# --------------------------------------------------------------------------------------------------------------------
# Generic fallback: always runs
# --------------------------------------------------------------------------------------------------------------------


def test_generic_similarity_scores_a_jittered_copy_above_a_different_face():
    assert_same_face_beats_different_face(ImageSimilarityLikeness())


def test_generic_similarity_is_labelled_as_a_fallback():
    backend = ImageSimilarityLikeness(reason="no face")
    assert backend.label == GENERIC_LABEL == "generic image similarity (whole images, not faces)"
    assert backend.reason == "no face"


def test_generic_similarity_is_one_for_identical_images_and_lower_for_unrelated_ones():
    backend = ImageSimilarityLikeness()
    img = astronaut()
    assert backend.score([img], [img]) == pytest.approx(1.0, abs=1e-6)
    assert backend.score([data.coffee()], [img]) < 0.8


def test_score_takes_the_best_matching_reference_and_averages_previews():
    backend = ImageSimilarityLikeness()
    a, g = astronaut(), grace_hopper()
    assert backend.score([a], [g, a]) == pytest.approx(1.0, abs=1e-6)
    mixed = backend.score([a, g], [a])
    assert mixed == pytest.approx((1.0 + backend.score([g], [a])) / 2, abs=1e-6)


def test_references_are_embedded_once_and_reused():
    backend = ImageSimilarityLikeness()
    refs = backend.embed_references([astronaut()])
    assert backend.score_embedded(jittered_astronauts(), refs) == pytest.approx(
        backend.score(jittered_astronauts(), [astronaut()])
    )
    assert backend.score_embedded([astronaut()], []) is None


def test_images_without_a_face_choose_the_labelled_fallback():
    backend = choose_backend([data.coffee(), data.rocket()])
    assert isinstance(backend, ImageSimilarityLikeness)
    assert backend.label == GENERIC_LABEL
    assert backend.reason  # says why: the extra is missing, or no face was found


# --------------------------------------------------------------------------------------------------------------------
# Face backend: needs the [likeness] extra
# --------------------------------------------------------------------------------------------------------------------


@needs_face
def test_face_likeness_scores_the_same_face_under_crop_scale_and_colour_jitter_above_a_different_face(face_backend):
    backend = face_backend
    assert_same_face_beats_different_face(backend)
    # dlib's own tolerance: the same person within distance 0.6, i.e. similarity above 0.4; different below.
    assert backend.score(jittered_astronauts(), [astronaut()]) > 0.6
    assert backend.score([grace_hopper()], [astronaut()]) < 0.4


@needs_face
def test_face_embedding_is_none_without_a_face(face_backend):
    backend = face_backend
    assert backend.embed(data.coffee()) is None
    assert backend.embed(astronaut()).shape == (128,)


@needs_face
def test_face_score_is_none_when_references_have_no_face_and_zero_for_faceless_previews(face_backend):
    backend = face_backend
    assert backend.score([astronaut()], [data.coffee()]) is None
    assert backend.score([data.coffee()], [astronaut()]) == 0.0  # the identity is gone from that preview


@needs_face
def test_choose_backend_uses_faces_when_the_training_images_show_one():
    backend = choose_backend([data.coffee(), astronaut()])
    assert isinstance(backend, FaceLikeness) and backend.label == FACE_LABEL


def test_without_the_extra_choose_backend_says_how_to_install_it(monkeypatch):
    import klein_core.health.likeness as likeness

    monkeypatch.setattr(likeness, "face_backend_available", lambda: (False, "dlib is not installed: pip install x"))
    backend = likeness.choose_backend([astronaut()])
    assert isinstance(backend, ImageSimilarityLikeness) and "not installed" in backend.reason
