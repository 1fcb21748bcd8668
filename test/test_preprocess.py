"""Image preprocessing: resize with pad geometry, [-1, 1] scaling, input validation, camera masks."""


import numpy as np
import pytest

from pi_policy.model.preprocess import image_to_model, prepare_images, resize_with_pad, to_rgb_uint8


def _rows_cols_nonzero(img):
    nz = img.max(axis=2) > 0
    rows, cols = np.flatnonzero(nz.any(axis=1)), np.flatnonzero(nz.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


@pytest.mark.parametrize("h,w,top,rh,left,rw", [
    (480, 640, 28, 168, 0, 224),   # landscape: padded top and bottom equally
    (640, 480, 0, 224, 28, 168),   # portrait: padded left and right
    (100, 301, 75, 74, 0, 224),    # int(100 / (301/224)) = 74; odd padding (150) -> 75 top, 75 bottom
    (50, 75, 37, 149, 0, 224),     # upscaling; 224 - 149 = 75 -> 37 top, 38 bottom (openpi: odd pixel last)
])
def test_resize_with_pad_geometry_matches_openpi(h, w, top, rh, left, rw):
    img = np.full((h, w, 3), 200, dtype=np.uint8)
    out = resize_with_pad(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    r0, r1, c0, c1 = _rows_cols_nonzero(out)
    assert (r0, r1 - r0 + 1, c0, c1 - c0 + 1) == (top, rh, left, rw)
    assert (out[top:top + rh, left:left + rw] == 200).all()


def test_resize_identity_when_already_square_size():
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_with_pad(img), img)


def test_resize_close_to_openpi_client_pil_bilinear():
    Image = pytest.importorskip("PIL.Image")
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) % 256], axis=-1).astype(np.uint8)
    img[:, :, 2] = 128 + (60 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.int16)
    # openpi-client: PIL bilinear resize to (224, 168), pasted at (0, 28) on black.
    ref = np.zeros((224, 224, 3), dtype=np.uint8)
    ref[28:196] = np.asarray(Image.fromarray(img).resize((224, 168), resample=Image.BILINEAR))
    out = resize_with_pad(img, 224)
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert (out[:28] == 0).all() and (out[196:] == 0).all()
    assert diff.mean() < 0.5 and diff.max() <= 3, (diff.mean(), diff.max())
    # On noise an aliasing resize (plain bilinear without antialiasing) is ~25 levels off on average.
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ref[28:196] = np.asarray(Image.fromarray(noise).resize((224, 168), resample=Image.BILINEAR))
    diff = np.abs(resize_with_pad(noise, 224).astype(int) - ref.astype(int))
    assert diff.mean() < 8, diff.mean()


def test_image_to_model_range_and_layout():
    img = np.zeros((2, 3, 3), dtype=np.uint8)
    img[0, 0] = [0, 128, 255]
    x = image_to_model(img)
    assert x.shape == (3, 2, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)
    assert x.max() == 1.0 and x.min() == -1.0
    assert (x[:, 1, :] == -1).all()


def test_conversions_mono_rgba_float():
    mono = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (to_rgb_uint8(mono) == mono[:, :, None]).all() and to_rgb_uint8(mono).shape == (3, 4, 3)
    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgba[:, :, :3])
    f = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32)
    assert to_rgb_uint8(f).tolist() == [[[0, 128, 255]]]


@pytest.mark.parametrize("img,match", [
    (np.zeros((4, 4, 2), np.uint8), "HxW"),
    (np.zeros((3, 4, 4, 3), np.uint8), "HxW"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 4, 3), 200.0, np.float32), r"\[0, 1\]"),
    (np.full((4, 4, 3), -0.5, np.float64), r"\[0, 1\]"),
    (np.zeros((4, 4, 3), np.uint16), "dtype"),
])
def test_bad_images_raise_clear_errors(img, match):
    with pytest.raises(ValueError, match=match):
        resize_with_pad(img)
    with pytest.raises(TypeError):
        to_rgb_uint8([[1, 2, 3]])


def test_prepare_images_masks_missing_and_ignores_unknown(captured_log):
    rng = np.random.default_rng(2)
    cams = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    right = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    images = {"base_0_rgb": base, "right_wrist_0_rgb": right, "left_wrist_0_rgb": None, "thermal_test_only": right}
    with captured_log("pi_policy.model.preprocess") as log:
        pixels, mask = prepare_images(images, cams, 224)
    assert "thermal_test_only" in log.text
    assert pixels.shape == (3, 3, 224, 224) and pixels.dtype == np.float32
    assert mask.tolist() == [True, False, True]
    assert (pixels[1] == -1).all()
    np.testing.assert_allclose(pixels[0], image_to_model(resize_with_pad(base)))
    np.testing.assert_allclose(pixels[2], right.transpose(2, 0, 1) / 255 * 2 - 1, atol=1e-6)
    assert pixels.min() >= -1 and pixels.max() <= 1

    pixels, mask = prepare_images({}, cams, 32)
    assert pixels.shape == (3, 3, 32, 32) and not mask.any()


def test_prepare_images_errors_name_the_camera():
    with pytest.raises(ValueError, match="'cam1'.*NaN"):
        prepare_images({"cam1": np.full((4, 4, 3), np.nan)}, ["cam0", "cam1"])
    with pytest.raises(ValueError, match="duplicates"):
        prepare_images({}, ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        prepare_images({}, [])
    with pytest.raises(TypeError, match="dict"):
        prepare_images([np.zeros((4, 4, 3), np.uint8)], ["cam0"])
