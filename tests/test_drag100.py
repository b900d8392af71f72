"""Drag100 (GoodDrag's benchmark layout): reading the shared samples, its mask rule, per-field errors, and a tree
that mixes DragBench, our format and Drag100 validated, converted both ways and served to batch runs."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dragdiffusion.data import find_samples, read_drag100_sample, read_sample, sample_layout
from dragdiffusion.data import convert, validate
from dragdiffusion.data.convert import convert_dataset, write_drag100_sample, write_folder_sample
from dragdiffusion.data.datamodule import DragDataModule
from dragdiffusion.data.readers import read_drag100_mask
from dragdiffusion.data.validate import check_dataset, format_report
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import SampleError

from conftest import REPO

DRAG100 = REPO.parent / "shared" / "data" / "drag100-sample"
DRAG100_POINTS = {  # the shared samples' points.json, as pairs
    "art_0": ([(195, 33), (456, 39), (393, 61)], [(90, 86), (471, 105), (393, 125)]),
    "car_0": ([(206, 322)], [(270, 324)]),
    "cat_2": ([(147, 67), (410, 88)], [(202, 46), (336, 54)]),
}


@pytest.fixture(scope="module")
def drag100_dir():
    if not DRAG100.is_dir():
        pytest.skip(f"the shared Drag100 sample is not at {DRAG100}")
    return DRAG100


def test_the_shared_drag100_samples_read_as_flat_folders_with_an_empty_prompt(drag100_dir):
    folders = find_samples(drag100_dir)
    assert [f.relative_to(drag100_dir).as_posix() for f in folders] == ["art_0", "car_0", "cat_2"]
    for folder in folders:
        assert sample_layout(folder) == "drag100"
        s = read_sample(folder, folder.name)
        handles, targets = DRAG100_POINTS[folder.name]
        assert s.handles == [tuple(map(float, p)) for p in handles]
        assert s.targets == [tuple(map(float, p)) for p in targets]
        assert s.image.shape == (512, 512, 3) and s.prompt == "" and s.name == folder.name
        raw = np.asarray(Image.open(folder / "mask.png"))
        assert s.mask.dtype == np.uint8 and np.array_equal(s.mask, (raw > 127).astype(np.uint8)) and s.has_mask


def test_an_rgb_mask_counts_by_its_first_channel_above_127(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[:, :5, 0] = 255  # red: editable
    rgb[:, 5:, 1:] = 255  # green + blue, red 0: not editable (luminance would say yes)
    rgb[0, 0, 0] = 100  # dim red: not editable (> 127 is)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = np.zeros((8, 10), np.uint8)
    expected[:, :5] = 1
    expected[0, 0] = 0
    assert np.array_equal(read_drag100_mask(tmp_path / "rgb.png"), expected)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_drag100_mask(tmp_path / "rgba.png"), expected)
    Image.fromarray(expected * 255).save(tmp_path / "l.png")
    assert np.array_equal(read_drag100_mask(tmp_path / "l.png"), expected)


def drag100_folder(root, name, points=None, mask_size=None, doc=None):
    """A Drag100 sample of the 64 x 48 demo drawing; ``doc`` replaces points.json's content."""
    s = demo_sample(64, 48)
    folder = write_drag100_sample(s, root / name)
    if points is not None or doc is not None:
        (folder / "points.json").write_text(json.dumps(doc if doc is not None else {"points": points}))
    if mask_size is not None:
        Image.fromarray(np.zeros(mask_size[::-1], np.uint8)).save(folder / "mask.png")
    return folder


def test_bad_drag100_samples_get_per_field_errors(tmp_path):
    root = tmp_path / "data"
    drag100_folder(root, "good")
    drag100_folder(root, "no_points_key", doc={"pts": [[1, 2], [3, 4]]})
    drag100_folder(root, "not_a_dict", doc=[[1, 2], [3, 4]])
    drag100_folder(root, "points_not_a_list", doc={"points": "[[1, 2], [3, 4]]"})
    drag100_folder(root, "odd", points=[[1, 2], [3, 4], [5, 6]])
    drag100_folder(root, "outside", points=[[1, 2], [70, 4]])
    drag100_folder(root, "mask_size", mask_size=(10, 10))
    (drag100_folder(root, "garbled") / "points.json").write_text("{not json")
    (drag100_folder(root, "no_image") / "original.jpg").unlink()
    checks = {c.name: c for c in check_dataset(root)}
    assert checks["good"].ok and checks["good"].pairs == 1
    assert 'points.json: expected {"points"' in checks["no_points_key"].error
    assert "['pts']" in checks["no_points_key"].error
    assert "points.json: expected" in checks["not_a_dict"].error and "list" in checks["not_a_dict"].error
    assert "points.json: expected" in checks["points_not_a_list"].error
    assert "points: odd number of points (3 points = 1 handle/target pair + 1 handle without its target)" \
        in checks["odd"].error
    assert "points: target 0 at (x=70.0, y=4.0) is outside the image" in checks["outside"].error
    assert "mask: mask is 10x10 px but the image is 64x48" in checks["mask_size"].error
    assert "points.json: not valid JSON" in checks["garbled"].error
    assert "image: file not found" in checks["no_image"].error and "original.jpg" in checks["no_image"].error
    for name, check in checks.items():
        assert check.ok or check.error.startswith(f"sample '{name}': "), check.error
    assert format_report(list(checks.values())).startswith("9 samples, 1 pairs, 1 valid, 8 invalid")
    with pytest.raises(SampleError, match="holds none of .*points.json \\+ original.jpg \\(Drag100\\)"):
        read_sample(tmp_path)


def mixed_tree(root, dragbench_dir, drag100_dir):
    """A DragBench sample (category/sample), two Drag100 samples (flat, beside it) and one of our format."""
    name = "animals/JH_2023-09-14-1838-08"
    shutil.copytree(dragbench_dir / name, root / name)
    for n in ("car_0", "cat_2"):
        shutil.copytree(drag100_dir / n, root / n)
    s = demo_sample(64, 48)
    s.name = "ours/demo"
    write_folder_sample(s, root / "ours" / "demo")
    return [name, "car_0", "cat_2", "ours/demo"]


def assert_same_points_mask_prompt(a, b):
    assert a.handles == b.handles and a.targets == b.targets and a.prompt == b.prompt
    assert np.array_equal(a.mask, b.mask) if a.has_mask else not b.has_mask
    assert a.image.shape == b.image.shape


def test_a_mixed_tree_validates_and_converts_to_every_layout(tmp_path, dragbench_dir, drag100_dir, capsys):
    src = tmp_path / "mixed"
    names = mixed_tree(src, dragbench_dir, drag100_dir)
    checks = check_dataset(src)
    assert [c.name for c in checks] == sorted(names) and all(c.ok for c in checks)
    assert validate.main([str(src)]) == 0
    assert capsys.readouterr().out.startswith(f"4 samples, {sum(c.pairs for c in checks)} pairs, 4 valid, 0 invalid")
    originals = {n: read_sample(src / n, n) for n in names}
    for layout, marker in (("folder", "drag.json"), ("dragbench", "meta_data.pkl"), ("drag100", "points.json")):
        out = tmp_path / layout
        assert convert.main([str(src), str(out), "--to", layout]) == 0
        assert sorted(f.relative_to(out).as_posix() for f in find_samples(out)) == sorted(names)  # mirrored tree
        for n, original in originals.items():
            assert (out / n / marker).is_file()
            back = read_sample(out / n, n)
            assert_same_points_mask_prompt(original, back)
            if layout == "drag100":  # JPEG at quality 100 without chroma subsampling: near-lossless
                diff = np.abs(back.image.astype(int) - original.image.astype(int))
                assert diff.mean() < 1.5 and diff.max() <= 40
            else:
                assert np.array_equal(back.image, original.image)
    # Drag100 written by us: the layout GoodDrag reads (+ the prompt of a sample that has one)
    written = tmp_path / "drag100" / "ours" / "demo"
    assert sorted(p.name for p in written.iterdir()) == ["image_with_points.jpg", "mask.png", "original.jpg",
                                                         "points.json"]
    doc = json.loads((written / "points.json").read_text())
    assert doc["points"] == [list(p) for p in originals["ours/demo"].points]
    assert doc["prompt"] == "a red ball on a gradient"
    assert set(json.loads((tmp_path / "drag100" / "car_0" / "points.json").read_text())) == {"points"}
    assert Image.open(written / "mask.png").mode == "L"
    # and back from Drag100 to DragBench
    assert convert_dataset(tmp_path / "drag100", tmp_path / "db2", "dragbench") == {n: None for n in sorted(names)}


def test_batch_data_module_serves_a_mixed_tree_under_its_mirror_names(tmp_path, dragbench_dir, drag100_dir):
    names = mixed_tree(tmp_path / "mixed", dragbench_dir, drag100_dir)
    entries = [(c.name, c.path) for c in check_dataset(tmp_path / "mixed")]
    dm = DragDataModule(entries, is_done=lambda name: False)
    dm.setup("predict")
    items = [item for batch in dm.predict_dataloader() for item in batch]
    assert [i["name"] for i in items] == sorted(names) and all(i["error"] is None for i in items)
    assert {i["name"]: i["sample"].prompt for i in items}["car_0"] == ""


def test_drag100_reader_directly(drag100_dir):
    s = read_drag100_sample(drag100_dir / "car_0")
    assert s.name == "car_0" and s.handles == [(206.0, 322.0)]
