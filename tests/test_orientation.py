"""Phone photos: the EXIF orientation tag is applied wherever an image is read (edit, batch, train, evaluate, the
app's upload, masks), so points, masks and outputs are in the orientation viewers show; outputs carry no tag."""
import json

import numpy as np
import pytest
from PIL import Image

from dragdiffusion.data import read_sample
from dragdiffusion.errors import SampleError
from dragdiffusion.sample import ReadLimits, make_sample, read_image, read_mask
from test_app import app_url, browser, page, status, upload  # noqa: F401 - the page fixtures and actions

ORIENTATION = 0x0112
# what a viewer does to the stored pixels for each tag (PIL's ImageOps.exif_transpose), and its inverse
SHOW = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def shown_photo(w: int = 200, h: int = 300) -> np.ndarray:
    """The picture as the user sees it: portrait, a red block top left, a blue block bottom right."""
    img = np.full((h, w, 3), 128, np.uint8)
    img[10:60, 10:50] = (255, 0, 0)
    img[h - 60:h - 10, w - 50:w - 10] = (0, 0, 255)
    return img


def write_tagged(path, shown: np.ndarray, orientation: int, fmt: str = "PNG"):
    """Store ``shown`` turned so that a viewer applying ``orientation`` shows ``shown`` again."""
    stored = Image.fromarray(shown).transpose(STORE[orientation])
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as check:  # the file really is stored sideways, with the tag
        assert check.getexif()[ORIENTATION] == orientation
        assert check.size == stored.size
    return path


def shown_mask(w: int = 200, h: int = 300) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[150:290, 20:120] = 255  # the lower left region, in the shown orientation
    return m


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_images_and_masks_are_read_as_viewers_show_them(tmp_path, orientation):
    shown = shown_photo()
    image = write_tagged(tmp_path / "photo.png", shown, orientation)
    mask = tmp_path / "mask.png"
    stored_mask = Image.fromarray(shown_mask()).transpose(STORE[orientation])
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored_mask.save(mask, exif=exif.tobytes())
    assert np.array_equal(read_image(image), shown)
    assert np.array_equal(read_mask(mask), (shown_mask() > 127).astype(np.uint8))
    # points given as the user sees the photo: (100, 250) is inside 200 x 300, outside the stored 300 x 200
    sample = make_sample(image, [[100, 250], [100, 200]], mask=mask, name="phone")
    assert (sample.width, sample.height) == (200, 300)
    assert sample.mask.shape == (300, 200) and sample.mask[200, 50] == 1 and sample.mask[50, 150] == 0


def test_phone_jpeg_of_the_issue_takes_points_as_shown(tmp_path):
    """A 300 x 200 JPEG with orientation 6 is shown 200 x 300: its points are accepted as shown."""
    image = write_tagged(tmp_path / "phone.jpg", shown_photo(), 6, "JPEG")
    with Image.open(image) as raw:
        assert raw.size == (300, 200)
    sample = make_sample(image, [[100, 250], [100, 200]], name="phone")
    assert (sample.width, sample.height) == (200, 300)
    assert np.abs(sample.image.astype(int) - shown_photo()).mean() < 3  # JPEG: close, not exact
    assert tuple(sample.image[30, 30]) > (200, 0, 0) and sample.image[30, 30, 2] < 60  # red block top left


def test_sample_folders_of_both_layouts_are_upright(tmp_path):
    """Batch, train and evaluate read through the same readers: our folder format and DragBench's."""
    ours = tmp_path / "ours"
    ours.mkdir()
    write_tagged(ours / "image.png", shown_photo(), 8)
    mask = Image.fromarray(shown_mask()).transpose(STORE[8])
    exif = Image.Exif()
    exif[ORIENTATION] = 8
    mask.save(ours / "mask.png", exif=exif.tobytes())
    (ours / "drag.json").write_text(json.dumps({"prompt": "", "handles": [[60, 280]], "targets": [[60, 240]]}))
    s = read_sample(ours)
    assert (s.width, s.height) == (200, 300) and s.mask.shape == (300, 200) and s.mask[200, 50] == 1


def test_a_tagged_decompression_bomb_is_still_refused(tmp_path):
    image = write_tagged(tmp_path / "big.png", shown_photo(40, 60), 6)
    with pytest.raises(SampleError, match="max_image_pixels"):
        read_image(image, limits=ReadLimits(max_image_pixels=40 * 60 - 1))
    assert read_image(image, limits=ReadLimits(max_image_pixels=40 * 60)).shape == (60, 40, 3)


def test_a_pil_image_with_a_tag_is_turned_too(tmp_path):
    image = write_tagged(tmp_path / "photo.png", shown_photo(), 6)
    with Image.open(image) as img:
        sample = make_sample(img, [[100, 250], [100, 200]])
        assert img.size == (300, 200)  # the caller's image is left as it was
    assert np.array_equal(sample.image, shown_photo())


def test_the_apps_upload_is_upright(tmp_path):
    pytest.importorskip("gradio")
    from gradio.data_classes import FileData
    from dragdiffusion.app import UprightImageEditor
    editor = UprightImageEditor(type="numpy", image_mode="RGBA", render=False)
    assert editor.get_block_name() == "imageeditor"  # the page's component is gradio's own editor
    for orientation in (3, 6, 8):
        image = write_tagged(tmp_path / f"up{orientation}.png", shown_photo(), orientation)
        value = editor.convert_and_format_image(FileData(path=str(image), orig_name=image.name),
                                                flatten_on_white=True)
        assert np.array_equal(np.asarray(value)[..., :3], shown_photo())
    plain = tmp_path / "plain.png"
    Image.fromarray(shown_photo()).save(plain)
    value = editor.convert_and_format_image(FileData(path=str(plain), orig_name=plain.name), flatten_on_white=True)
    assert np.array_equal(np.asarray(value)[..., :3], shown_photo())


def test_an_edit_of_a_phone_photo_is_written_upright_without_the_tag(tiny_editor, tmp_path):
    image = write_tagged(tmp_path / "phone.jpg", shown_photo(), 6, "JPEG")
    sample = make_sample(image, [[100, 250], [100, 200]], name="phone")
    result = tiny_editor.edit(sample)
    out = result.save(tmp_path / "out", tiny_editor.cfg)
    for name in ("dragged_image.png", "drag_input.png"):
        with Image.open(out / name) as img:
            assert img.size == (200, 300)
            assert img.getexif().get(ORIENTATION, 1) == 1


@pytest.mark.browser
def test_the_pages_upload_of_a_phone_photo_is_upright(page, tmp_path):
    """Through the page in Chromium: the upload of a 300 x 200 JPEG tagged orientation 6 is a 200 x 300 image."""
    upload(page, write_tagged(tmp_path / "phone.jpg", shown_photo(), 6, "JPEG"))
    assert status(page).startswith("image 200x300 px"), status(page)
