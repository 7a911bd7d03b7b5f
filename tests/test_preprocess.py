import numpy as np
import pytest

from bluesky_ptychonn.core.config import DetectorGeometry, PreprocessRecipe, validated
from bluesky_ptychonn.core.preprocess import bad_frames, check_frames, fitted_scale, preprocess
from bluesky_ptychonn.errors import ConfigurationError, FrameError


def test_crop_bin_resize_threshold_transform():
    frames = np.arange(2 * 128 * 128, dtype=np.uint32).reshape(2, 128, 128)
    r = PreprocessRecipe(frame_shape=(128, 128), crop_pixels=64, bin_factor=2, transform="none")
    out = preprocess(frames, r)
    assert out.shape == (2, 32, 32) and out.dtype == np.float32
    # First output pixel: mean of the 2x2 block at the crop's corner (rows 32-33, cols 32-33).
    assert out[0, 0, 0] == pytest.approx(frames[0, 32:34, 32:34].mean())
    resized = preprocess(frames, PreprocessRecipe(frame_shape=(128, 128), resize_pixels=64, transform="none"))
    assert resized.shape == (2, 64, 64)
    assert resized.sum() == pytest.approx(frames.astype(np.float64).sum() / 4, rel=1e-5)  # area-preserving mean
    thresh = preprocess(np.full((1, 64, 64), 2, np.uint32), PreprocessRecipe(threshold_counts=3, transform="none"))
    assert not thresh.any()
    assert preprocess(np.full((1, 64, 64), 16, np.uint32), PreprocessRecipe(transform="sqrt", scale=2))[0, 0, 0] == 8
    assert preprocess(np.full((1, 64, 64), np.e - 1), PreprocessRecipe(transform="log1p"))[0, 0, 0] == pytest.approx(1)


def test_orientation_is_explicit():
    frame = np.zeros((1, 64, 64), np.uint32)
    frame[0, 1, 2] = 9
    r = PreprocessRecipe(transpose=True, flip_rows=True, transform="none")
    assert preprocess(frame, r)[0, 64 - 1 - 2, 1] == 9


def test_recipe_pixel_size_follows_crop_and_bin():
    g = DetectorGeometry(frame_pixels=128)
    assert PreprocessRecipe(frame_shape=(128, 128), bin_factor=2).pixel_size_m(g) == pytest.approx(g.pixel_size_m())
    assert PreprocessRecipe(frame_shape=(128, 128), crop_pixels=64).pixel_size_m(g) == pytest.approx(
        2 * g.pixel_size_m()
    )
    assert PreprocessRecipe(frame_shape=(128, 128), resize_pixels=64).pixel_size_m(g) == pytest.approx(
        2 * g.pixel_size_m()
    )


def test_bad_recipes_are_refused():
    with pytest.raises(ConfigurationError, match="divisible"):
        validated(PreprocessRecipe, {"frame_shape": (64, 64), "bin_factor": 3})
    with pytest.raises(ConfigurationError, match="not square"):
        validated(PreprocessRecipe, {"frame_shape": (64, 32)})
    with pytest.raises(ConfigurationError, match="exceeds"):
        validated(PreprocessRecipe, {"frame_shape": (64, 64), "crop_pixels": 128})


def test_bad_frames_are_named():
    r = PreprocessRecipe()
    with pytest.raises(FrameError, match=r"shape \(N, 64, 64\)"):
        preprocess(np.zeros((3, 32, 32)), r)
    nan = np.zeros((3, 64, 64))
    nan[1, 5, 5] = np.nan
    with pytest.raises(FrameError, match="batch index 1"):
        preprocess(nan, r)
    neg = np.zeros((3, 64, 64))
    neg[2, 0, 0] = -1
    with pytest.raises(FrameError, match="batch index 2"):
        check_frames(neg, (64, 64))
    assert bad_frames(neg).tolist() == [False, False, True]
    with pytest.raises(FrameError, match="dtype"):
        check_frames(np.zeros((1, 64, 64), dtype=object), (64, 64))


def test_fitted_scale_normalises_the_mean():
    frames = np.random.default_rng(0).poisson(50, (4, 64, 64)).astype(np.uint32)
    r = PreprocessRecipe()
    scale = fitted_scale(frames, r)
    assert preprocess(frames, r.model_copy(update={"scale": scale})).mean() == pytest.approx(0.1, rel=1e-4)
