"""Tests for cxr_tf.data.ingest and the `python -m pipeline.ingest` CLI."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxr_tf.data import ingest
from cxr_tf.data import preprocess
from cxr_tf.data import schema
from cxr_tf.data import tfrecord

REPO = pathlib.Path(__file__).resolve().parents[2]
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)


def _png_bytes(height, width, mode="L"):
    rng = np.random.default_rng(height * 1000 + width)
    pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode != "L":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_tiny_data_dir(root):
    """A Kaggle-layout data folder where each row exercises one case.

    Returns:
      dict image_id -> expected outcome ("written" or a skip reason).
    """
    root = pathlib.Path(root)
    first = root / "images_001" / "images"
    second = root / "images_002" / "images"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    good = _png_bytes(64, 48)
    files = {
        first / "00000001_000.png": good,
        first / "00000001_001.png": _png_bytes(40, 40, "RGBA"),
        second / "00000002_000.png": _png_bytes(64, 48),
        # Corrupt: a PNG signature followed by garbage.
        second / "00000003_000.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20,
        # Truncated: the first half of a valid PNG.
        second / "00000004_000.png": good[: len(good) // 2],
        second / "00000005_000.png": b"",  # zero bytes
        second / "00000006_000.png": b"this is not an image\n",
        first / "00000008_000.png": good,
        first / "00000009_000.png": good,
        first / "00000010_000.png": _png_bytes(30, 50),
        first / "00000100_000.png": good,  # not in Data_Entry
    }
    for path, data in files.items():
        path.write_bytes(data)
    rows = [
        "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
        "00000001_001.png,No Finding,1,1,58,M,AP,2894,2729,0.143,0.143",
        "00000002_000.png,Mass|Nodule,0,2,81,F,PA,2500,2048,0.168,0.168",
        "00000003_000.png,Effusion,0,3,81,F,PA,2500,2048,0.168,0.168",
        "00000004_000.png,Atelectasis,0,4,20,M,PA,2500,2048,0.168,0.168",
        "00000005_000.png,No Finding,0,5,33,F,PA,2500,2048,0.168,0.168",
        "00000006_000.png,Hernia,0,6,44,F,PA,2500,2048,0.168,0.168",
        "00000007_000.png,Infiltration,0,7,50,M,AP,2500,2048,0.168,0.168",
        "00000008_000.png,Alien Finding,0,8,50,M,AP,2500,2048,0.168,0.168",
        "00000009_000.png,No Finding,0,9,50,M,AP,2500,2048,0.168,0.168",
        "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
        "00000010_000.png,Pneumonia|Edema,0,10,61,F,PA,2500,2048,0.168,0.168",
    ]
    (root / "Data_Entry_2017_v2020.csv").write_text(HEADER + "\n".join(rows) + "\n")
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000002_000.png,Mass,4.5,8,20,30\n"
        "00000002_000.png,Nodule,40,50,20,30\n"  # beyond the 48x64 image: clipped
        "00000099_000.png,Infiltrate,1,1,5,5\n"  # image not in Data_Entry
        "00000010_000.png,Pneumonia,10,5,25,10\n"
    )
    (root / "train_val_list.txt").write_text(
        "00000001_000.png\n00000001_001.png\n00000004_000.png\n00000005_000.png\n"
        "00000006_000.png\n00000008_000.png\n00000010_000.png"
    )
    (root / "test_list.txt").write_text(
        "00000002_000.png\n00000003_000.png\n00000007_000.png\n"
    )
    return {
        "00000001_000.png": "written",
        "00000001_001.png": "written",
        "00000002_000.png": "written",
        "00000010_000.png": "written",
        "00000003_000.png": ingest.CORRUPT_IMAGE,
        "00000004_000.png": ingest.CORRUPT_IMAGE,
        "00000005_000.png": ingest.CORRUPT_IMAGE,
        "00000006_000.png": ingest.CORRUPT_IMAGE,
        "00000007_000.png": ingest.MISSING_FILE,
        "00000008_000.png": ingest.UNKNOWN_LABEL,
        "00000009_000.png": ingest.NOT_IN_SPLIT_LIST,
    }


def _config(data_dir, output_dir, **kwargs):
    args = dict(
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        image_size=32,
        max_skip_fraction=1.0,
        running_mode="in_memory",
        num_workers=1,
    )
    args.update(kwargs)
    return ingest.IngestConfig(**args)


def _records(output_dir):
    out = {}
    for split in schema.SPLITS:
        try:
            examples = list(tfrecord.read_examples(output_dir, split))
        except FileNotFoundError:
            continue
        for example in examples:
            out[example["image_id"]] = dict(example, split=split)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    expected = make_tiny_data_dir(data_dir)
    output_dir = tmp_path_factory.mktemp("records")
    report = ingest.run_ingest(_config(data_dir, output_dir))
    return data_dir, output_dir, expected, report


def test_every_row_is_written_or_skipped_with_its_reason(tiny):
    _, output_dir, expected, report = tiny
    assert report["rows_read"] == 12
    assert report["rows_read"] == report["rows_written"] + report["rows_skipped"]
    assert report["rows_written"] == 4
    skipped = {}
    for entry in report["skipped"]:
        skipped.setdefault(entry["image_id"], []).append(entry["reason"])
    # The second 00000001_000.png row is the duplicate; the first is written.
    assert skipped.pop("00000001_000.png") == [ingest.DUPLICATE]
    for image_id, outcome in expected.items():
        if outcome == "written":
            assert image_id not in skipped
        else:
            assert skipped[image_id] == [outcome], image_id
    details = {e["image_id"]: e.get("detail", "") for e in report["skipped"]}
    assert "00000005_000.png" in details["00000005_000.png"]
    assert report["skipped_by_reason"][ingest.CORRUPT_IMAGE] == 4
    on_disk = json.loads((output_dir / schema.INGEST_REPORT).read_text())
    assert on_disk["rows_skipped"] == report["rows_skipped"]
    assert on_disk["skipped"] == report["skipped"]


def test_box_rows_and_unlisted_files_are_reported(tiny):
    _, _, _, report = tiny
    assert report["box_skipped"] == [
        {"row": 4, "image_id": "00000099_000.png", "reason": "image not in Data_Entry"}
    ]
    [clipped] = report["box_notes"]
    assert (clipped["row"], clipped["image_id"]) == (3, "00000002_000.png")
    assert "clipped" in clipped["reason"]
    assert report["unlisted_image_files"] == 1
    assert report["box_rows_read"] == 4
    assert report["boxes_written"] == 3
    assert report["box_rows_skipped"] == 1
    assert report["skipped_folders"] == []


def test_records_hold_labels_boxes_and_resized_images(tiny):
    _, output_dir, _, report = tiny
    records = _records(output_dir)
    assert sorted(records) == [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
        "00000010_000.png",
    ]
    assert sum(report["written"].values()) == 4
    assert report["written"]["test"] == 1
    first = records["00000001_000.png"]
    assert first["labels"][schema.FINDINGS.index("Cardiomegaly")] == 1
    assert first["labels"].sum() == 1
    assert (first["patient_id"], first["sex"], first["view_position"]) == (
        "00000001",
        "M",
        "PA",
    )
    assert first["age"] == 58.0
    # 64x48 -> longer side 32, aspect kept; the original size is kept too.
    assert first["pixels"].shape == (32, 24)
    assert (first["original_height"], first["original_width"]) == (64, 48)
    assert records["00000001_001.png"]["pixels"].shape == (32, 32)
    assert records["00000010_000.png"]["pixels"].shape == (19, 32)
    assert records["00000001_001.png"]["labels"].sum() == 0

    boxed = records["00000002_000.png"]
    assert boxed["split"] == "test"
    np.testing.assert_array_equal(
        boxed["box_labels"],
        [schema.FINDINGS.index("Mass"), schema.FINDINGS.index("Nodule")],
    )
    # [ymin, xmin, ymax, xmax] normalised by the 48x64 file; the second clipped.
    np.testing.assert_allclose(
        boxed["boxes"],
        [[8 / 64, 4.5 / 48, 38 / 64, 24.5 / 48], [50 / 64, 40 / 48, 1.0, 1.0]],
        atol=1e-6,
    )
    pneumonia = records["00000010_000.png"]
    np.testing.assert_allclose(
        pneumonia["boxes"], [[5 / 30, 10 / 50, 15 / 30, 35 / 50]], atol=1e-6
    )
    # Pixels are the area-resized file (compared with an independent resize).
    original = np.asarray(Image.open(io.BytesIO(_png_bytes(30, 50))))
    reference = np.asarray(
        Image.fromarray(original).resize((32, 19), Image.Resampling.BOX)
    )
    np.testing.assert_array_equal(pneumonia["pixels"], reference)


def test_no_patient_in_two_splits(tiny):
    _, output_dir, _, _ = tiny
    patients = {}
    for record in _records(output_dir).values():
        patients.setdefault(record["patient_id"], set()).add(record["split"])
    assert all(len(s) == 1 for s in patients.values()), patients


def test_rerun_gives_identical_files(tiny, tmp_path):
    data_dir, output_dir, _, report = tiny
    again = ingest.run_ingest(_config(data_dir, tmp_path))
    names = sorted(p.name for p in output_dir.glob("*.tfrecord.gz"))
    assert names == sorted(p.name for p in tmp_path.glob("*.tfrecord.gz"))
    assert names == sorted(
        ingest.SHARD_TEMPLATE.format(split=split, shard=shard, num_shards=count)
        for split, count in report["num_shards"].items()
        for shard in range(count)
    )
    assert len(names) >= 2
    for name in names:
        assert (output_dir / name).read_bytes() == (tmp_path / name).read_bytes()
    assert again["skipped"] == report["skipped"]


def test_existing_records_need_overwrite(tiny):
    data_dir, output_dir, _, _ = tiny
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest.run_ingest(_config(data_dir, output_dir))


def test_skip_fraction_fails_after_writing_the_report(tiny, tmp_path):
    data_dir, _, _, _ = tiny
    with pytest.raises(ingest.SkipFractionExceededError, match="8 of 12 rows") as info:
        ingest.run_ingest(_config(data_dir, tmp_path, max_skip_fraction=0.5))
    assert info.value.report["rows_written"] == 4
    assert (tmp_path / schema.INGEST_REPORT).exists()


def test_table_search_and_ambiguity(tmp_path):
    expected = make_tiny_data_dir(tmp_path)
    assert expected
    found, images = ingest.scan_data_dir(tmp_path)
    assert images["00000002_000.png"] == [
        str(tmp_path / "images_002" / "images" / "00000002_000.png")
    ]
    config = _config(tmp_path, tmp_path / "out")
    tables = ingest.resolve_tables(config, found)
    assert tables["data_entry"].endswith("Data_Entry_2017_v2020.csv")
    assert tables["test_list"].endswith("test_list.txt")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "Data_Entry_2017.csv").write_text(HEADER)
    # Re-saved variants are not candidates; a second version is.
    (tmp_path / "meta" / "BBox_List_2017.excel_resaved.csv").write_text("x\n")
    found, _ = ingest.scan_data_dir(tmp_path)
    with pytest.raises(ingest.AmbiguousTableError) as info:
        ingest.resolve_tables(config, found)
    message = str(info.value)
    assert "Data_Entry_2017.csv" in message
    assert "Data_Entry_2017_v2020.csv" in message
    assert "--data_entry" in message
    explicit = _config(
        tmp_path,
        tmp_path / "out",
        data_entry=str(tmp_path / "meta/Data_Entry_2017.csv"),
    )
    assert ingest.resolve_tables(explicit, found)["bbox_list"].endswith(
        "BBox_List_2017.csv"
    )
    missing = _config(tmp_path, tmp_path / "out", bbox_list=str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ingest.resolve_tables(missing, found)


def test_real_sample_lists_both_data_entry_tables(cxr14_sample):
    found, images = ingest.scan_data_dir(cxr14_sample)
    config = _config(cxr14_sample, "/tmp/unused")
    with pytest.raises(ingest.AmbiguousTableError) as info:
        ingest.resolve_tables(config, found)
    assert "Data_Entry_2017.csv" in str(info.value)
    assert "Data_Entry_2017_v2020.csv" in str(info.value)
    assert len([n for n in images if n.endswith(".png")]) == 135


def test_resize_longer_side():
    pixels = np.arange(60 * 30, dtype=np.uint8).reshape(60, 30)
    assert preprocess.resize_longer_side(pixels, 20).shape == (20, 10)
    assert preprocess.resize_longer_side(pixels, 0) is pixels
    assert preprocess.resize_longer_side(pixels, 100) is pixels  # never upscales
    flat = np.full((64, 64), 200, np.uint8)
    assert (preprocess.resize_longer_side(flat, 16) == 200).all()


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="`max_skip_fraction` must be in"):
        _config(tmp_path, tmp_path, max_skip_fraction=1.5)
    with pytest.raises(ValueError, match="`running_mode` must be one of"):
        _config(tmp_path, tmp_path, running_mode="threads")
    with pytest.raises(ValueError, match="`dicom_orientation` must be one of"):
        _config(tmp_path, tmp_path, dicom_orientation="content")
    with pytest.raises(FileNotFoundError, match="`data_dir` not found"):
        ingest.run_ingest(_config(tmp_path / "absent", tmp_path))


def _csv_truth(meta):
    """Labels and boxes read straight from the CSVs, independently of cxr_tf."""
    labels = {}
    with open(meta / "Data_Entry_2017_v2020.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            names = set(row[1].split("|"))
            labels[row[0]] = [int(name in names) for name in schema.FINDINGS]
    boxes = {}
    with open(meta / "BBox_List_2017.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            name = {"Infiltrate": "Infiltration"}.get(row[1], row[1])
            x, y, w, h = (float(v) for v in row[2:6])
            box = [y / 1024, x / 1024, (y + h) / 1024, (x + w) / 1024]
            boxes.setdefault(row[0], []).append((schema.FINDINGS.index(name), box))
    return labels, boxes


@pytest.mark.slow
def test_real_sample_ingest(cxr14_sample, tmp_path):
    meta = cxr14_sample / "meta"
    config = ingest.IngestConfig(
        data_dir=str(cxr14_sample),
        output_dir=str(tmp_path),
        data_entry=str(meta / "Data_Entry_2017_v2020.csv"),
        image_size=128,
        max_skip_fraction=1.0,
    )
    report = ingest.run_ingest(config)
    files = sorted(p.name for p in (cxr14_sample / "images").glob("*.png"))
    assert report["rows_read"] == 112_120
    assert report["rows_written"] == len(files) == 135
    assert report["rows_read"] == report["rows_written"] + report["rows_skipped"]
    assert report["skipped_by_reason"] == {ingest.MISSING_FILE: 112_120 - 135}
    assert not {s["image_id"] for s in report["skipped"]} & set(files)

    labels, boxes = _csv_truth(meta)
    test_list = set((meta / "test_list.txt").read_text().split())
    records = _records(tmp_path)
    assert sorted(records) == files
    patients = {}
    for image_id, record in records.items():
        np.testing.assert_array_equal(record["labels"], labels[image_id])
        assert record["pixels"].shape == (128, 128)
        assert (record["original_height"], record["original_width"]) == (1024, 1024)
        assert (record["split"] == "test") == (image_id in test_list)
        expected = sorted(boxes.get(image_id, []))
        got = sorted(zip(record["box_labels"].tolist(), record["boxes"].tolist()))
        assert [label for label, _ in got] == [label for label, _ in expected]
        for (_, got_box), (_, want_box) in zip(got, expected):
            np.testing.assert_allclose(got_box, np.clip(want_box, 0, 1), atol=1e-6)
        patients.setdefault(record["patient_id"], set()).add(record["split"])
    assert all(len(s) == 1 for s in patients.values())
    assert sum(1 for i in records if i in boxes) == 91


@pytest.mark.parametrize("orientation", ["auto", "header"])
def test_sample_dicoms_ingest_and_a_wrong_header_is_reported(
    cxr14_sample, tmp_path, orientation
):
    # The SIIM DICOM and its copy relabelled MONOCHROME1 (same pixel data).
    data_dir = tmp_path / "data"
    (data_dir / "images").mkdir(parents=True)
    dicom = cxr14_sample / "dicom"
    sources = {
        "00000001_000.dcm": dicom
        / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        "00000002_000.dcm": dicom / "Fake_MONOHR1.dcm",
        "00000003_000.dcm": dicom / "CR-MONO1-10-chest.dcm",
    }
    for name, source in sources.items():
        (data_dir / "images" / name).write_bytes(source.read_bytes())
    rows = [
        f"{name},No Finding,0,{i + 1},50,M,PA,1024,1024,0.143,0.143"
        for i, name in enumerate(sources)
    ]
    (data_dir / "Data_Entry_2017.csv").write_text(HEADER + "\n".join(rows) + "\n")
    output_dir = tmp_path / "records"
    report = ingest.run_ingest(
        _config(data_dir, output_dir, image_size=64, dicom_orientation=orientation)
    )
    assert report["rows_read"] == report["rows_written"] == 3
    records = _records(output_dir)
    siim = records["00000001_000.dcm"]["pixels"]
    fake = records["00000002_000.dcm"]["pixels"]
    assert siim.shape == fake.shape == (64, 64)
    on_disk = json.loads((output_dir / schema.INGEST_REPORT).read_text())
    if orientation == "auto":
        np.testing.assert_array_equal(fake, siim)
        [entry] = report["orientation_corrected"]
        assert entry["image_id"] == "00000002_000.dcm"
        assert (
            "MONOCHROME1" in entry["reason"] and "00000002_000.dcm" in entry["reason"]
        )
    else:
        # The negative, up to the area resize's rounding.
        diff = fake.astype(int) - (255 - siim.astype(int))
        assert np.abs(diff).max() <= 1
        assert report["orientation_corrected"] == []
    assert on_disk["orientation_corrected"] == report["orientation_corrected"]
    assert on_disk["config"]["dicom_orientation"] == orientation


@pytest.mark.slow
def test_cli_runs_on_tiny_data(tmp_path):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    flagfile = tmp_path / "ingest.flags"
    flagfile.write_text(f"--data_dir={data_dir}\n--image_size=32\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "pipeline.ingest",
        f"--flagfile={flagfile}",
        f"--output_dir={tmp_path / 'out'}",
        "--max_skip_fraction=0.9",
        "--num_workers=2",
        "--direct_running_mode=multi_processing",  # a Beam option, passed through
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows_written"] == 4
    assert summary["rows_read"] == 12
    report = json.loads((tmp_path / "out" / schema.INGEST_REPORT).read_text())
    assert report["rows_skipped"] == 8
    # Counted in the two worker processes, logged by the driver.
    assert "ingest: 8/8 films in " in result.stderr

    # Too many skipped rows: exit status 1, the report still written.
    failing = command[:4] + [
        f"--output_dir={tmp_path / 'out2'}",
        "--max_skip_fraction=0.1",
        "--running_mode=in_memory",
    ]
    result = subprocess.run(
        failing, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1
    assert "max_skip_fraction" in result.stderr
    assert (tmp_path / "out2" / schema.INGEST_REPORT).exists()
