import numpy as np
import pytest

from bluesky_ptychonn.core.metrics import compare, pearson, psnr, remove_phase_offset, ssim


def test_identical_images():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(40, 40))
    assert ssim(img, img, 1.0) == pytest.approx(1.0)
    assert psnr(img, img, 1.0) == float("inf")
    assert pearson(img, img) == pytest.approx(1.0)


def test_ssim_falls_with_noise_and_psnr_matches_mse():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(40, 40))
    noisy = img + rng.normal(0, 0.1, img.shape)
    assert 0 < ssim(noisy, img, 1.0) < 0.95
    assert psnr(noisy, img, 1.0) == pytest.approx(10 * np.log10(1 / np.mean((noisy - img) ** 2)))


def test_global_phase_offset_is_removed_across_the_wrap():
    rng = np.random.default_rng(1)
    ref = rng.uniform(-1, 1, (30, 30))
    shifted = np.angle(np.exp(1j * (ref + 2.9)))  # wraps for part of the image
    mask = np.ones_like(ref, bool)
    np.testing.assert_allclose(remove_phase_offset(shifted, ref, mask), ref, atol=1e-9)
    m = compare(np.ones_like(ref), shifted, np.ones_like(ref), ref, mask)
    assert m["phase_ssim"] == pytest.approx(1.0) and m["phase_pearson"] == pytest.approx(1.0)


def test_compare_uses_the_region_only():
    ref = np.zeros((30, 30))
    ref[5:15, 5:15] = np.linspace(0, 1, 100).reshape(10, 10)
    img = ref.copy()
    img[20:, 20:] = 5.0  # outside the region: ignored
    mask = np.zeros_like(ref, bool)
    mask[5:15, 5:15] = True
    assert compare(img, img, ref, ref, mask)["amplitude_ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        compare(img, img, ref, ref, np.zeros_like(mask))


def test_frc_resolution_grows_with_blur_and_is_finest_for_a_perfect_image():
    from bluesky_ptychonn.core.metrics import frc_resolution_px
    from bluesky_ptychonn.sim.physics import _smooth, random_features_object

    truth = np.angle(random_features_object((160, 160), 1))
    noise = 0.01 * np.random.default_rng(0).normal(size=truth.shape)
    assert frc_resolution_px(truth, truth) == 2.0
    figures = [frc_resolution_px(_smooth(truth, sigma) + noise, truth) for sigma in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(figures, figures[1:], strict=False))
    assert 1.5 < figures[2] / figures[1] < 2.5  # twice the blur, about twice the period


def test_local_mean_of_a_constant_is_the_constant_away_from_edges():
    from bluesky_ptychonn.core.metrics import local_mean

    image = np.full((40, 40), 2.0)
    image[20, 20] = 2.0 + 81.0
    out = local_mean(image, np.ones((9, 9)))
    assert out[5, 5] == pytest.approx(2.0)
    assert out[20, 20] == pytest.approx(3.0)  # the spike spread over the 9 x 9 kernel
    assert out[16, 16] == pytest.approx(3.0) and out[15, 15] == pytest.approx(2.0)
