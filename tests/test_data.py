"""Datasets: the restricted unpickler, DragBench <-> folder conversion, up-front validation, sharding."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dragdiffusion.data import find_samples, read_sample, safe_load_pickle
from test_hostile import png_bomb
from dragdiffusion.data import convert, validate
from dragdiffusion.data.convert import convert_dataset, write_dragbench_sample, write_folder_sample
from dragdiffusion.data.datamodule import DragDataModule, SampleFolders, ShardSampler, shard_indices
from dragdiffusion.data.validate import check_dataset, format_report
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import SampleError, UnsafePickleError


class _Payload:
    """Unpickling this calls ``func(*args)``: what a malicious meta_data.pkl does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_pickle(path, marker):
    """A DragBench-looking meta_data.pkl whose unpickling would run ``touch marker`` through os.system."""
    meta = {"prompt": "a cat", "points": [[1, 1], [5, 5]], "mask": _Payload(os.system, f"touch {marker}")}
    path.write_bytes(pickle.dumps(meta, protocol=4))


# ----------------------------------------------------------------------------------------------- unpickler

@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_safe_unpickler_reads_plain_data_of_every_protocol(tmp_path, protocol):
    meta = {"prompt": "a dog", "points": [[10, 20], [30.5, 40]], "mask": np.eye(5, 7, dtype=np.uint8),
            "scale": np.float32(0.5), "raw": b"\x00\xff", "nested": (1, [2, {"a": None}])}
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
    got = safe_load_pickle(tmp_path / "m.pkl")
    assert got["points"] == meta["points"] and got["prompt"] == "a dog" and got["raw"] == b"\x00\xff"
    assert got["mask"].dtype == np.uint8 and np.array_equal(got["mask"], meta["mask"])
    assert got["scale"] == np.float32(0.5) and got["nested"] == meta["nested"]


@pytest.mark.parametrize("func,args", [
    (os.system, "touch {marker}"),
    (eval, "open('{marker}', 'w').close()"),
    (exec, "open('{marker}', 'w').close()"),
    (getattr, None),  # gadgets such as getattr(array, 'tofile') need builtins.getattr
], ids=["os.system", "eval", "exec", "getattr"])
def test_malicious_pickle_is_refused_before_anything_runs(tmp_path, func, args):
    marker = tmp_path / "pwned"
    payload = _Payload(func, np.zeros(1), "tofile") if args is None else _Payload(func, args.format(marker=marker))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({"prompt": "x", "points": payload}, protocol=4))
    with pytest.raises(UnsafePickleError, match="refused to load"):
        safe_load_pickle(tmp_path / "m.pkl")
    assert not marker.exists()


def test_codecs_helper_admits_latin1_only(tmp_path):
    ok = pickle.dumps({"b": b"\x01\x02"}, protocol=2)  # protocol 2 writes bytes via _codecs.encode(.., 'latin1')
    assert b"_codecs" in ok
    (tmp_path / "ok.pkl").write_bytes(ok)
    assert safe_load_pickle(tmp_path / "ok.pkl") == {"b": b"\x01\x02"}
    (tmp_path / "bad.pkl").write_bytes(ok.replace(b"latin1", b"rot_13"))
    with pytest.raises(UnsafePickleError, match="latin1"):
        safe_load_pickle(tmp_path / "bad.pkl")


def test_truncated_pickle_is_a_broken_sample_not_an_attack(tmp_path):
    data = pickle.dumps({"prompt": "x", "points": [[1, 2], [3, 4]]}, protocol=4)
    (tmp_path / "m.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match="not a readable pickle") as info:
        safe_load_pickle(tmp_path / "m.pkl", "cat/s1")
    assert not isinstance(info.value, UnsafePickleError) and "cat/s1" in str(info.value)


def test_dragbench_subset_reads_through_the_safe_unpickler(dragbench_dir):
    folders = find_samples(dragbench_dir)
    assert len(folders) == 10
    for folder in folders:
        s = read_sample(folder, folder.relative_to(dragbench_dir).as_posix())
        assert s.width == 512 and s.mask.shape == (s.height, s.width) and len(s.handles) >= 1
        assert "/" in s.name and isinstance(s.prompt, str)


# ----------------------------------------------------------------------------------------------- conversion

def assert_same_sample(a, b):
    assert np.array_equal(a.image, b.image)
    assert a.handles == b.handles and a.targets == b.targets and a.prompt == b.prompt
    assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)


def test_convert_dragbench_to_folder_and_back_is_lossless(tmp_path, dragbench_dir):
    src = tmp_path / "src"  # three of the shared samples (linked, to keep the test fast)
    for folder in find_samples(dragbench_dir)[:3]:
        (src / folder.parent.name).mkdir(parents=True)
        (src / folder.parent.name / folder.name).symlink_to(folder)
    assert convert.main([str(src), str(tmp_path / "ours"), "--to", "folder"]) == 0
    assert convert.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "dragbench"]) == 0
    originals = find_samples(src)
    assert len(originals) == 3
    for folder in originals:
        name = folder.relative_to(src).as_posix()
        ours = tmp_path / "ours" / name
        assert sorted(p.name for p in ours.iterdir()) == ["drag.json", "image.png", "mask.png"]
        drag = json.loads((ours / "drag.json").read_text())
        assert set(drag) == {"prompt", "handles", "targets"}
        original = read_sample(folder, name)
        assert_same_sample(original, read_sample(ours, name))
        back = tmp_path / "back" / name
        assert_same_sample(original, read_sample(back, name))
        meta = safe_load_pickle(back / "meta_data.pkl")
        assert set(meta) == {"prompt", "points", "mask"} and meta["mask"].dtype == np.uint8
        assert all(type(v) in (int, float) for p in meta["points"] for v in p)
        assert (back / "user_drag.png").is_file()


def test_sample_without_mask_gets_an_empty_dragbench_mask(tmp_path):
    s = demo_sample(64, 48)
    s.mask = None
    s.handles, s.targets = [(10.0, 12.5)], [(30.0, 12.5)]
    write_folder_sample(s, tmp_path / "ours" / "s")
    assert not (tmp_path / "ours" / "s" / "mask.png").exists()
    results = convert_dataset(tmp_path / "ours", tmp_path / "db", "dragbench")
    assert results == {"s": None}
    back = read_sample(tmp_path / "db" / "s")
    assert back.mask.shape == (48, 64) and not back.has_mask  # empty mask: no region constraint, as before
    assert back.handles == [(10.0, 12.5)]


def test_convert_skips_and_reports_unsafe_and_broken_samples(tmp_path):
    src = tmp_path / "src"
    write_folder_sample(demo_sample(64, 48), src / "good")
    write_dragbench_sample(demo_sample(64, 48), src / "evil")
    evil_pickle(src / "evil" / "meta_data.pkl", tmp_path / "pwned")
    write_folder_sample(demo_sample(64, 48), src / "broken")
    (src / "broken" / "image.png").write_bytes(b"not a png")
    assert convert.main([str(src), str(tmp_path / "dst"), "--to", "dragbench"]) == 1
    assert (tmp_path / "dst" / "good" / "meta_data.pkl").is_file()
    assert not (tmp_path / "dst" / "evil").exists() and not (tmp_path / "dst" / "broken").exists()
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------------- validation

def make_bad_dataset(root, marker):
    good = demo_sample(64, 48)
    write_folder_sample(good, root / "a" / "good")
    out = demo_sample(64, 48)
    out.targets = [(70.0, 10.0)]  # x beyond the 64-px width
    write_folder_sample(out, root / "a" / "target_outside")
    write_folder_sample(good, root / "a" / "unpaired")
    drag = json.loads((root / "a" / "unpaired" / "drag.json").read_text())
    drag["targets"] = []
    (root / "a" / "unpaired" / "drag.json").write_text(json.dumps(drag))
    write_folder_sample(good, root / "b" / "mask_size")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "b" / "mask_size" / "mask.png")
    write_dragbench_sample(good, root / "b" / "evil")
    evil_pickle(root / "b" / "evil" / "meta_data.pkl", marker)
    write_dragbench_sample(good, root / "b" / "db_good")
    write_folder_sample(good, root / "b" / "bomb")  # a decompression bomb: 15000 x 12000 px in a few hundred bytes
    png_bomb(root / "b" / "bomb" / "image.png")


def test_validation_reports_every_bad_sample_and_why(tmp_path, capsys):
    marker = tmp_path / "pwned"
    make_bad_dataset(tmp_path / "data", marker)
    checks = {c.name: c for c in check_dataset(tmp_path / "data")}
    assert sorted(checks) == ["a/good", "a/target_outside", "a/unpaired", "b/bomb", "b/db_good", "b/evil",
                              "b/mask_size"]
    assert "too large to decode" in checks["b/bomb"].error
    assert checks["a/good"].ok and checks["b/db_good"].ok
    assert "points" in checks["a/target_outside"].error and "outside the image" in checks["a/target_outside"].error
    assert "as many targets as handles" in checks["a/unpaired"].error
    assert "mask" in checks["b/mask_size"].error and "10x10" in checks["b/mask_size"].error
    assert checks["b/evil"].unsafe and not checks["a/unpaired"].unsafe
    assert not marker.exists()
    report = format_report(list(checks.values()))
    assert report.startswith("7 samples, 2 pairs, 2 valid, 5 invalid")
    assert "UNSAFE: b/evil" in report and "invalid: a/unpaired" in report
    assert validate.main([str(tmp_path / "data")]) == 2  # an unsafe pickle: refuse
    (tmp_path / "data" / "b" / "evil" / "meta_data.pkl").unlink()
    assert validate.main([str(tmp_path / "data")]) == 1  # bad samples only
    assert "invalid: a/target_outside" in capsys.readouterr().out


def test_validation_of_an_empty_or_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(SampleError, match="no samples found"):
        check_dataset(tmp_path)
    with pytest.raises(SampleError, match="dataset folder not found"):
        check_dataset(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_sample_once_without_padding(world):
    for n in range(0, 10):
        shards = [list(ShardSampler(n, r, world)) for r in range(world)]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n))  # each exactly once: no repeats, none lost
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # torch's DistributedSampler would pad 7 samples on 2 ranks to 8 (a sample edited twice)
    ds = torch.utils.data.DistributedSampler(range(7), num_replicas=2, rank=1, shuffle=False)
    assert len(ds) == 4 and len(shard_indices(7, 1, 2)) == 3


def test_shard_indices_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


def test_datamodule_skips_done_samples_and_carries_read_errors_as_data(tmp_path):
    write_folder_sample(demo_sample(64, 48), tmp_path / "s0")
    write_folder_sample(demo_sample(64, 48), tmp_path / "s1")
    write_folder_sample(demo_sample(64, 48), tmp_path / "s2")
    entries = [(f"s{i}", tmp_path / f"s{i}") for i in range(3)]
    dm = DragDataModule(entries, is_done=lambda name: name == "s1")
    dm.setup("predict")
    assert [n for n, _ in dm.pending] == ["s0", "s2"] and dm.skipped == ["s1"]
    (tmp_path / "s2" / "image.png").write_bytes(b"garbage")  # broken after validation
    items = [item for batch in dm.predict_dataloader() for item in batch]
    assert [i["name"] for i in items] == ["s0", "s2"]
    assert items[0]["error"] is None and items[0]["sample"].width == 64
    assert items[1]["sample"] is None and "image" in items[1]["error"]
    assert len(SampleFolders(dm.pending)) == 2
