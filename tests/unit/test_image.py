import io
import pickle
import time
import warnings

import imagekinds as kinds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from raypipe import schema
from raypipe.schema import Status
from raypipe.transforms.image import (
    RESIZE_MODES,
    ImageError,
    _decode_plain_jpeg,
    ImageOptions,
    image_rows,
    load_rgb,
    pixels_as_bytes,
    preprocess_images,
    unpack_images,
)

OPTS = ImageOptions()


def error_of(data, status: Status, opts=OPTS) -> ImageError:
    """The ImageError that decoding `data` raises, which must have `status` (its str starts with it)."""
    with pytest.raises(ImageError, match=f"^{status.value}: ") as info:
        load_rgb(data, opts)
    return info.value


def left_right(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the outer quarter on each side (away from the blurred middle)."""
    quarter = img.shape[1] // 4
    return img[:, :quarter].reshape(-1, 3).mean(0), img[:, -quarter:].reshape(-1, 3).mean(0)


def assert_colour(actual, expected, tol=12):
    assert np.abs(np.asarray(actual, float) - expected).max() <= tol, f"{np.round(actual)} != {expected}"


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("kind", sorted(kinds.EXPECTED_OK))
def test_ok_kinds_decode_to_square_rgb(kind, mode):
    img = load_rgb(kinds.ALL_KINDS[kind](), ImageOptions(size=48, resize_mode=mode))
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and img.flags.c_contiguous


# What each failing kind's message must say (its status comes from imagekinds.EXPECTED_STATUS).
CAUSES = {
    "png_bomb": "declared 8000x8000 = 6.4e+07 pixels exceeds max_pixels=4e+07",
    "gif_bomb": "declared 7000x7000",
    "png_bomb_huge": "decompression bomb",
    "jpeg_truncated": "JPEG decode failed: OSError: image file is truncated",
    "png_truncated": "PNG decode failed: OSError",
    "empty": "empty",
    "random_bytes": "not a supported image format",
    "svg": "first bytes b'<?xml",
}


def test_every_failing_kind_has_an_expected_cause():
    assert set(CAUSES) == set(kinds.ALL_KINDS) - kinds.EXPECTED_OK


@pytest.mark.parametrize("kind, cause", sorted(CAUSES.items()))
def test_bad_kinds_get_their_status_and_a_specific_message(kind, cause):
    err = error_of(kinds.ALL_KINDS[kind](), Status(kinds.EXPECTED_STATUS[kind]))
    assert cause in err.message


def test_none_is_missing_and_non_bytes_is_a_decode_error():
    error_of(None, Status.MISSING_IMAGE)
    assert "TypeError" in error_of(3.5, Status.IMAGE_DECODE_ERROR).message


def test_image_error_pickles():
    err = pickle.loads(pickle.dumps(ImageError(Status.IMAGE_TOO_SMALL, "too small")))
    assert (err.status, err.message, str(err)) == (Status.IMAGE_TOO_SMALL, "too small", "image_too_small: too small")


@pytest.mark.parametrize("kind", ["png_rgba", "png_palette_transparent", "webp_alpha"])
def test_transparent_pixels_are_composited_on_white(kind):
    left, right = left_right(load_rgb(kinds.ALL_KINDS[kind](), OPTS))
    assert_colour(left, kinds.WHITE, tol=1)  # black underneath: ignoring alpha would show black
    assert_colour(right, kinds.GREEN if kind != "png_palette_transparent" else kinds.BLUE)


def test_gray_with_alpha_is_composited_on_white():
    left, right = left_right(load_rgb(kinds.png_la(), OPTS))
    assert_colour(left, kinds.WHITE, tol=1)
    assert_colour(right, (100, 100, 100), tol=1)


@pytest.mark.parametrize("kind", ["png_gray16", "tiff_gray16_be", "tiff_int32", "tiff_float"])
def test_wide_grayscale_is_scaled_not_clipped(kind):
    left, right = left_right(load_rgb(kinds.ALL_KINDS[kind](), OPTS))
    assert_colour(left, (128, 128, 128), tol=1)  # clipping would give 255
    assert_colour(right, (240, 240, 240), tol=1)


def test_wide_grayscale_without_known_range_is_stretched():
    values = np.array([[-1000.0, 3000.0]], dtype=np.float32).repeat(64, axis=0).repeat(32, axis=1)
    left, right = left_right(load_rgb(kinds.encode(Image.fromarray(values), "TIFF"), OPTS))
    assert_colour(left, kinds.BLACK, tol=1)
    assert_colour(right, kinds.WHITE, tol=1)


@pytest.mark.parametrize(
    "kind, left, right",
    [
        ("png_palette", kinds.RED, kinds.BLUE),
        ("png_1bit", kinds.BLACK, kinds.WHITE),
        ("jpeg_cmyk", kinds.RED, kinds.BLUE),
        ("wide_10000x10", kinds.RED, kinds.BLUE),
    ],
)
def test_colour_layout_survives_conversion(kind, left, right):
    got_left, got_right = left_right(load_rgb(kinds.ALL_KINDS[kind](), OPTS))
    assert_colour(got_left, left)
    assert_colour(got_right, right)


@pytest.mark.parametrize(
    "kind, first_frame", [("gif_animated", kinds.RED), ("png_animated", kinds.GREEN), ("webp_animated", kinds.RED)]
)
def test_animated_images_give_the_first_frame(kind, first_frame):
    img = load_rgb(kinds.ALL_KINDS[kind](), OPTS)
    assert_colour(img.reshape(-1, 3).mean(0), first_frame, tol=2)


def test_exif_orientation_6_turns_left_red_right_blue_into_top_red_bottom_blue():
    img = load_rgb(kinds.jpeg_exif_rotated(), OPTS)
    assert_colour(img[:16].reshape(-1, 3).mean(0), kinds.RED)
    assert_colour(img[-16:].reshape(-1, 3).mean(0), kinds.BLUE)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation, mode):
    data = kinds.jpeg_oriented(orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    expected = {
        "stretch": lambda: upright.resize((64, 64), Image.Resampling.BILINEAR),
        "center_crop": lambda: ImageOps.fit(upright, (64, 64), Image.Resampling.BILINEAR),
        "pad": lambda: ImageOps.pad(upright, (64, 64), Image.Resampling.BILINEAR, color=kinds.WHITE),
    }[mode]()
    diff = np.abs(load_rgb(data, ImageOptions(resize_mode=mode)).astype(int) - np.asarray(expected))
    assert diff.mean() < 2


def test_jpeg_draft_is_close_to_a_full_decode():
    data = kinds.jpeg_photo(2048, 1536)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    diff = np.abs(load_rgb(data, OPTS).astype(int) - np.asarray(full))
    assert diff.mean() < 1.5 and diff.max() < 16


def _with_exif_orientation_1(data: bytes) -> bytes:
    """The same JPEG (same scan data) with an EXIF block saying "upright", which sends it down the
    Pillow path: the plain JPEG takes the simplejpeg one."""
    exif = Image.Exif()
    exif[0x0112] = 1
    segment = exif.tobytes()
    app1 = b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment
    return data[:2] + app1 + data[2:]


# 640x480 to 64x64: stretch and center_crop need 64 rows, so 1/4 scale (160x120; 1/8 would be 60
# rows); pad needs only 48 rows (the short side is padded), so 1/8 scale. Both decode paths agree.
@pytest.mark.parametrize("mode, expected", [("stretch", (160, 120)), ("center_crop", (160, 120)), ("pad", (80, 60))])
def test_jpeg_decodes_as_small_as_the_resize_mode_allows_on_both_paths(monkeypatch, mode, expected):
    drafted = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, *args):
        result = original(self, *args)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    plain, opts = kinds.jpeg_photo(640, 480), ImageOptions(resize_mode=mode)
    assert _decode_plain_jpeg(plain, opts).shape == (expected[1], expected[0], 3)
    load_rgb(_with_exif_orientation_1(plain), opts)
    assert drafted == [expected]


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize(
    "width, height, save",
    [
        (640, 480, {}),
        (383, 257, {"subsampling": 0}),  # 4:4:4
        (200, 200, {"subsampling": 1}),  # 4:2:2; Pillow's 1/2 scale where libjpeg-turbo has 3/8 too
        (65, 130, {"progressive": True}),
        (1000, 37, {}),
        (48, 40, {}),  # smaller than the output: no scaling at all
    ],
)
def test_the_simplejpeg_path_gives_exactly_the_pillow_paths_pixels(width, height, save, mode):
    opts = ImageOptions(resize_mode=mode)
    for plain in (kinds.jpeg_photo(width, height, **save), kinds.encode(kinds.photo(width, height).convert("L"), "JPEG")):
        assert _decode_plain_jpeg(plain, opts) is not None
        via_pillow = _with_exif_orientation_1(plain)
        assert _decode_plain_jpeg(via_pillow, opts) is None
        np.testing.assert_array_equal(load_rgb(plain, opts), load_rgb(via_pillow, opts))


@pytest.mark.parametrize("kind", ["jpeg_cmyk", "jpeg_truncated"])
def test_jpegs_the_fast_path_cannot_take_go_to_pillow(kind):
    assert _decode_plain_jpeg(kinds.ALL_KINDS[kind](), OPTS) is None


@pytest.mark.parametrize("kind", ["png_bomb", "png_bomb_huge", "gif_bomb"])
def test_bombs_are_refused_from_the_header_fast(kind):
    data = kinds.ALL_KINDS[kind]()
    assert len(data) < 10_000
    start = time.perf_counter()
    error_of(data, Status.IMAGE_TOO_LARGE)
    assert time.perf_counter() - start < 0.05  # decoding 64M+ pixels would take far longer


def test_the_png_bomb_is_a_real_image_under_a_higher_limit():
    img = load_rgb(kinds.png_bomb(), ImageOptions(max_pixels=70_000_000))
    assert img.max() == 0  # all black: the guard, not a decode error, refused it before


def test_max_pixels_and_min_side_are_checked_on_the_declared_size():
    data = kinds.jpeg_photo()
    assert "640x480" in error_of(data, Status.IMAGE_TOO_LARGE, ImageOptions(max_pixels=640 * 480 - 1)).message
    load_rgb(data, ImageOptions(max_pixels=640 * 480))
    err = error_of(kinds.ALL_KINDS["wide_10000x10"](), Status.IMAGE_TOO_SMALL, ImageOptions(min_side=11))
    assert "10000x10" in err.message and "min_side=11" in err.message
    error_of(kinds.ALL_KINDS["tiny_1x1"](), Status.IMAGE_TOO_SMALL, ImageOptions(min_side=2))


def test_pillow_bomb_warning_and_error_never_escape(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # 40x40 = 1600 pixels: over Pillow's warning limit, under our max_pixels -> decodes.
        load_rgb(kinds.encode(Image.new("RGB", (40, 40), kinds.RED), "PNG"), OPTS)
        # 100x100: over twice Pillow's limit -> its DecompressionBombError, mapped to our status.
        error_of(kinds.encode(Image.new("RGB", (100, 100), kinds.RED), "PNG"), Status.IMAGE_TOO_LARGE)


def test_pad_keeps_the_aspect_ratio_with_white_bars():
    img = load_rgb(kinds.encode(Image.new("RGB", (128, 64), kinds.RED), "PNG"), ImageOptions(resize_mode="pad"))
    assert (img[:16] == 255).all() and (img[48:] == 255).all()
    assert_colour(img[17:47].reshape(-1, 3).mean(0), kinds.RED, tol=0)


def test_center_crop_keeps_the_centre_and_stretch_keeps_everything():
    thirds = Image.new("RGB", (192, 64), kinds.BLUE)
    thirds.paste(kinds.RED, (64, 0, 128, 64))
    thirds.paste(kinds.GREEN, (128, 0, 192, 64))
    data = kinds.encode(thirds, "PNG")
    crop = load_rgb(data, ImageOptions(resize_mode="center_crop"))
    assert_colour(crop.reshape(-1, 3).mean(0), kinds.RED, tol=0)
    stretch = load_rgb(data, ImageOptions(resize_mode="stretch"))
    assert_colour(stretch[:, :16].reshape(-1, 3).mean(0), kinds.BLUE, tol=1)
    assert_colour(stretch[:, 27:37].reshape(-1, 3).mean(0), kinds.RED, tol=1)
    assert_colour(stretch[:, -16:].reshape(-1, 3).mean(0), kinds.GREEN, tol=1)


def test_image_options_reject_nonsense():
    with pytest.raises(ValueError, match="resize_mode"):
        ImageOptions(resize_mode="squash")
    with pytest.raises(ValueError, match=r"size\n  Input should be greater than or equal to 8"):
        ImageOptions(size=0)


def make_batch(images: list) -> dict[str, np.ndarray]:
    column = np.empty(len(images), dtype=object)
    column[:] = images
    keys = np.array([str(i) for i in range(len(images))], dtype=object)
    return {schema.KEY: keys, schema.IMAGE: column, **schema.new_status_columns(len(images))}


def test_preprocess_images_decodes_good_rows_and_marks_bad_ones():
    good = kinds.jpeg_photo()
    batch = make_batch([good, None, kinds.random_bytes(), good, kinds.png_bomb(), kinds.png_rgba()])
    schema.mark_failed(batch, 3, Status.NOT_DOWNLOADED, "img2dataset: 404")

    out = preprocess_images(batch, OPTS)

    assert out[schema.IMAGE].shape == (6, 64, 64, 3) and out[schema.IMAGE].dtype == np.uint8
    statuses = ["ok", "missing_image", "image_decode_error", "not_downloaded", "image_too_large", "ok"]
    assert list(out[schema.STATUS]) == statuses
    assert out[schema.ERROR_MESSAGE][0] is None and out[schema.ERROR_MESSAGE][3] == "img2dataset: 404"
    assert "not a supported image format" in out[schema.ERROR_MESSAGE][2]
    assert np.array_equal(out[schema.IMAGE][0], load_rgb(good, OPTS))
    failed = ~schema.ok_mask(out)
    assert not out[schema.IMAGE][failed].any()  # zeros, including the pre-failed row never decoded
    assert out[schema.IMAGE][~failed].any(axis=(1, 2, 3)).all()
    assert list(out[schema.KEY]) == ["0", "1", "2", "3", "4", "5"]


def test_preprocess_images_accepts_a_numpy_bytes_array():
    batch = make_batch([])
    batch[schema.IMAGE] = np.array([kinds.png_palette()], dtype=np.bytes_)
    batch.update(schema.new_status_columns(1))
    out = preprocess_images(batch, ImageOptions(size=8))
    assert list(out[schema.STATUS]) == ["ok"] and out[schema.IMAGE].shape == (1, 8, 8, 3)


def test_preprocess_images_handles_an_empty_batch():
    out = preprocess_images(make_batch([]), ImageOptions(size=32))
    assert out[schema.IMAGE].shape == (0, 32, 32, 3) and out[schema.IMAGE].dtype == np.uint8
    assert len(out[schema.STATUS]) == 0


# --- prepared images in Parquet ---------------------------------------------------------------------


def _pixels(rows: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng(rows).integers(0, 256, (rows, size, size, 3), dtype=np.uint8)


def test_pixels_survive_bytes_and_parquet_whatever_the_chunks_and_slices(tmp_path):
    from ray.data.extensions import ArrowTensorArray  # the column type Ray Data gives prepare's output

    images = _pixels(7)
    tensor = ArrowTensorArray.from_numpy(images)
    column = pa.chunked_array([tensor.slice(0, 3), tensor.slice(3, 4)])  # sliced chunks: offsets != 0
    packed = pixels_as_bytes(column)
    assert packed.type == pa.large_binary() and len(packed) == 7 and all(len(v.as_py()) == 4 * 4 * 3 for v in packed)
    pq.write_table(pa.table({schema.IMAGE: packed}), tmp_path / "part.parquet")
    read = pq.read_table(tmp_path / "part.parquet")[schema.IMAGE]
    assert np.array_equal(image_rows(read), images)
    batch = unpack_images({schema.IMAGE: np.array(read.to_pylist(), dtype=object)}, 4)
    assert batch[schema.IMAGE].dtype == np.uint8 and np.array_equal(batch[schema.IMAGE], images)
    assert len(pixels_as_bytes(tensor.slice(0, 0))) == 0


def test_pixels_already_decoded_and_old_tensor_columns_are_read_as_they_are():
    images = _pixels(3)
    batch = {schema.IMAGE: images}
    assert unpack_images(batch, 4)[schema.IMAGE] is images  # streamed batches: nothing to do
    as_list = pa.chunked_array([pa.array([im.ravel().tolist() for im in images], pa.large_list(pa.uint8()))])
    assert np.array_equal(image_rows(as_list), images)  # prepared by an earlier raypipe
