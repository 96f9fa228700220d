"""Hostile input to ingest: each test is the attack, then the clear outcome
and a check that nothing good was lost."""

import logging
import os

import numpy as np
import pytest

from cxr_tf import errors
from cxr_tf.data import ingest
from cxr_tf.data import metadata
from cxr_tf.data import schema
from tests.data.test_ingest import HEADER
from tests.data.test_ingest import _config
from tests.data.test_ingest import _records
from tests.data.test_ingest import make_tiny_data_dir

WRITTEN = [
    "00000001_000.png",
    "00000001_001.png",
    "00000002_000.png",
    "00000010_000.png",
]


def _assert_accounts_hold(report):
    assert report["rows_read"] == report["rows_written"] + report["rows_skipped"]
    assert report["rows_skipped"] == len(report["skipped"])
    assert (
        report["box_rows_read"] == report["boxes_written"] + report["box_rows_skipped"]
    )
    assert report["box_rows_skipped"] == len(report["box_skipped"])


def _one_line_user_error(info, *needles):
    message = str(info.value)
    assert isinstance(info.value, errors.UserError)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- folders --------------------------------------------------------------------


def test_symlink_loop_and_repeated_links_are_reported_not_followed(
    tmp_path, caplog
):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    images = data_dir / "images_002" / "images"
    # The attack: a loop back to the root, a loop to the parent, a second
    # path to a folder and a second name for a film.
    (images / "loop").symlink_to("../..")
    (images / "up").symlink_to("..")
    (data_dir / "mirror").symlink_to("images_002/images")
    (data_dir / "images_001" / "images" / "00000002_000.png").symlink_to(
        images / "00000002_000.png"
    )
    caplog.set_level(logging.WARNING)
    output_dir = tmp_path / "records"
    report = ingest.run_ingest(_config(data_dir, output_dir))

    reasons = {f["path"]: f["reason"] for f in report["skipped_folders"]}
    assert reasons == {
        str(images / "loop"): ingest.LINK_LOOP,
        str(images / "up"): ingest.LINK_LOOP,
        str(data_dir / "mirror"): ingest.REPEATED_FOLDER,
    }
    assert all(f["target"] and f["detail"] for f in report["skipped_folders"])
    [warning] = [r for r in caplog.records if "not walked" in r.getMessage()]
    assert "\n" not in warning.getMessage() and "link_loop" in warning.getMessage()
    # Every real film once: no film listed twice, the same four written.
    assert report["duplicate_image_files"] == []
    assert sorted(_records(output_dir)) == WRITTEN
    assert report["rows_written"] == 4 and report["rows_read"] == 12
    _assert_accounts_hold(report)
    on_disk = (output_dir / schema.INGEST_REPORT).read_text()
    assert ingest.LINK_LOOP in on_disk


def test_folder_link_to_outside_is_walked_once(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(b"x")
    data_dir = tmp_path / "data"
    (data_dir / "sub").mkdir(parents=True)
    # Two links to one outside folder, and one into its parent's subtree.
    (data_dir / "link1").symlink_to(outside)
    (data_dir / "sub" / "link2").symlink_to(outside)
    skipped = []
    _, images = ingest.scan_data_dir(data_dir, skipped_folders=skipped)
    assert images == {"a.png": [str(data_dir / "link1" / "a.png")]}
    assert [(f["path"], f["reason"]) for f in skipped] == [
        (str(data_dir / "sub" / "link2"), ingest.REPEATED_FOLDER)
    ]


# --- tables ---------------------------------------------------------------------


def _plant_byte(path, image_id, byte=b"\xff"):
    lines = path.read_bytes().split(b"\n")
    [index] = [i for i, line in enumerate(lines) if line.startswith(image_id.encode())]
    # Into View Position: the id and the labels stay readable.
    lines[index] = lines[index].replace(b",PA,", b",P" + byte + b"A,")
    path.write_bytes(b"\n".join(lines))
    return index + 1  # 1-based line


def test_one_non_utf8_byte_reports_its_row_and_the_rest_is_written(tmp_path):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    table = data_dir / "Data_Entry_2017_v2020.csv"
    line = _plant_byte(table, "00000010_000.png")
    output_dir = tmp_path / "records"
    report = ingest.run_ingest(_config(data_dir, output_dir))

    [entry] = [s for s in report["skipped"] if s["row"] == line]
    assert entry["image_id"] == "00000010_000.png"
    assert entry["reason"] == ingest.MALFORMED_ROW
    assert entry["file"] == str(table)
    assert "0xff" in entry["detail"] and "UTF-8" in entry["detail"]
    # Every other good row is still written; its box row says why it is not.
    assert sorted(_records(output_dir)) == WRITTEN[:3]
    assert report["rows_read"] == 12
    [box] = [b for b in report["box_skipped"] if b["image_id"] == "00000010_000.png"]
    assert f"Data_Entry row {line} skipped" in box["reason"]
    _assert_accounts_hold(report)


def test_read_data_entry_keeps_rows_around_a_bad_byte(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    rows = [
        f"0000000{i}_000.png,No Finding,0,{i},50,M,PA,1,1,1,1" for i in range(1, 6)
    ]
    path.write_bytes((HEADER + "\n".join(rows) + "\n").encode())
    _plant_byte(path, "00000003_000.png", byte=b"\xc3\x28")  # invalid sequence
    entries, problems = metadata.read_data_entry(path)
    assert entries["image_id"].tolist() == [
        "00000001_000.png",
        "00000002_000.png",
        "00000004_000.png",
        "00000005_000.png",
    ]
    assert entries["row"].tolist() == [2, 3, 5, 6]
    [problem] = problems
    assert (problem["file"], problem["row"]) == (str(path), 4)
    assert problem["image_id"] == "00000003_000.png" and problem["dropped"]
    assert "0xc3" in problem["reason"] and "field 7" in problem["reason"]


def test_bad_byte_in_an_image_list_is_a_one_line_error(tmp_path):
    path = tmp_path / "test_list.txt"
    path.write_bytes(b"00000001_000.png\n0000\xfe0002_000.png\n")
    with pytest.raises(errors.UserValueError) as info:
        metadata.read_image_list(path)
    _one_line_user_error(info, str(path), "line 2", "0xfe")


def test_header_without_finding_labels_is_a_one_line_error(tmp_path):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    table = data_dir / "Data_Entry_2017_v2020.csv"
    table.write_text(table.read_text().replace("Finding Labels", "Findings", 1))
    output_dir = tmp_path / "records"
    with pytest.raises(errors.UserValueError) as info:
        ingest.run_ingest(_config(data_dir, output_dir))
    _one_line_user_error(info, str(table), "'Finding Labels'", "line 1")
    assert not list(output_dir.glob("*.tfrecord.gz"))


def test_planted_patient_leak_is_a_one_line_error_naming_both_lists(tmp_path):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    # Patient 1's second film, listed in train_val, is planted in test too.
    with open(data_dir / "test_list.txt", "a") as f:
        f.write("00000001_001.png\n")
    output_dir = tmp_path / "records"
    with pytest.raises(metadata.PatientLeakError) as info:
        ingest.run_ingest(_config(data_dir, output_dir))
    _one_line_user_error(
        info,
        "patient 00000001 in test and train",
        "train_val_list.txt",
        "test_list.txt",
        "one split only",
    )
    assert isinstance(info.value, errors.UserValueError)
    # Refused before any record is written: no leaked split on disk.
    assert not list(output_dir.glob("*.tfrecord.gz"))


def test_user_mistakes_raise_user_errors(tmp_path):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    with pytest.raises(errors.UserFileError) as info:
        ingest.run_ingest(_config(tmp_path / "absent", tmp_path / "out"))
    _one_line_user_error(info, "absent")
    with pytest.raises(errors.UserValueError) as info:
        _config(data_dir, tmp_path / "out", max_skip_fraction=2.0)
    _one_line_user_error(info, "max_skip_fraction")
    (data_dir / "meta").mkdir()
    (data_dir / "meta" / "Data_Entry_2017.csv").write_text(HEADER)
    found, _ = ingest.scan_data_dir(data_dir)
    with pytest.raises(ingest.AmbiguousTableError) as info:
        ingest.resolve_tables(_config(data_dir, tmp_path / "out"), found)
    _one_line_user_error(info, "Data_Entry_2017.csv", "--data_entry")


# --- boxes ----------------------------------------------------------------------

# The tiny film 00000002_000.png is 48 wide, 64 high.
_BOX_ROWS = [
    # (row text, outcome: "written", "clipped" or a word of the skip reason)
    ("00000002_000.png,Mass,4.5,8,20,30", "written"),
    ("00000002_000.png,Nodule,40,50,20,30", "clipped"),
    ("00000002_000.png,Mass,500,8,20,30", "outside"),  # right of the film
    ("00000002_000.png,Mass,-100,8,50,30", "outside"),  # left of the film
    ("00000002_000.png,Mass,4,-300,20,30", "outside"),  # above the film
    ("00000002_000.png,Mass,nan,8,20,30", "invalid box"),
    ("00000002_000.png,Mass,4,8,inf,30", "invalid box"),
    ("00000002_000.png,Mass,4,8,-20,30", "invalid box"),  # negative width
    ("00000002_000.png,Mass,4,8,20,0", "invalid box"),  # zero height
    ("00000002_000.png,Mass,1e308,8,1e308,30", "largest float"),
    ("00000002_000.png,Mass,4,8,0.25,30", "less than one pixel"),
    ("00000003_000.png,Effusion,4,8,20,30", "corrupt_image"),  # film unreadable
    ("00000007_000.png,Infiltrate,4,8,20,30", "missing_file"),
    ("00000009_000.png,Mass,4,8,20,30", "not_in_split_list"),
    ("00000099_000.png,Mass,4,8,20,30", "not in Data_Entry"),
    ("00000010_000.png,Pneumonia,10,5,25,10", "written"),
]


def test_every_bad_box_is_reported_with_its_row_and_never_written(tmp_path):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    (data_dir / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        + "\n".join(text for text, _ in _BOX_ROWS)
        + "\n"
    )
    output_dir = tmp_path / "records"
    report = ingest.run_ingest(_config(data_dir, output_dir))

    skipped = {b["row"]: b for b in report["box_skipped"]}
    notes = {b["row"]: b for b in report["box_notes"]}
    for row, (text, outcome) in enumerate(_BOX_ROWS, start=2):
        if outcome == "written":
            assert row not in skipped and row not in notes, text
        elif outcome == "clipped":
            assert row not in skipped and "clipped" in notes[row]["reason"], text
        else:
            assert outcome in skipped[row]["reason"], (text, skipped[row])
            assert skipped[row]["image_id"] == text.split(",")[0]
    assert report["box_rows_read"] == len(_BOX_ROWS) == 16
    assert report["boxes_written"] == 3
    _assert_accounts_hold(report)
    # The films are untouched by their bad boxes: all four written.
    records = _records(output_dir)
    assert sorted(records) == WRITTEN
    boxed = records["00000002_000.png"]
    # Only the good box and the clipped one; no zero-area truth box.
    np.testing.assert_allclose(
        boxed["boxes"],
        [[8 / 64, 4.5 / 48, 38 / 64, 24.5 / 48], [50 / 64, 40 / 48, 1.0, 1.0]],
        atol=1e-6,
    )
    for record in records.values():
        boxes = np.asarray(record["boxes"]).reshape(-1, 4)
        assert len(boxes) == len(record["box_labels"])
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_check_box():
    assert ingest.check_box(0, 0, 10, 20, 10, 20)[1] == ""
    box, note = ingest.check_box(-2, 0, 10, 20, 10, 20)
    np.testing.assert_allclose(box, [0, 0, 0.8, 1.0])
    assert "clipped" in note
    # Half a pixel outside is rounding, not a note.
    assert ingest.check_box(-0.5, 0, 10, 20, 10, 20)[1] == ""
    assert ingest.check_box(10, 0, 5, 5, 10, 20)[0] is None  # touches the edge
    assert ingest.check_box(9.5, 0, 5, 5, 10, 20)[0] is None  # half a pixel in
    assert ingest.check_box(float("-inf"), 0, 5, 5, 10, 20)[0] is None


# --- progress -------------------------------------------------------------------


class _FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_counts_every_process_with_rate_and_eta(tmp_path):
    # Two tallies stand for two worker processes appending to one folder.
    workers = [ingest.FilmTally(str(tmp_path)), ingest.FilmTally(str(tmp_path))]
    clock = _FakeClock()
    lines = []
    progress = ingest.IngestProgress(
        ingest.FilmTally(str(tmp_path)),
        120,
        clock=clock,
        log=lambda fmt, *args: lines.append(fmt % args),
    )

    def films(count, seconds):
        for i in range(count):
            workers[i % 2].add()
        clock.now += seconds
        return progress.line()

    assert films(0, 0) == "ingest: 0/120 films, starting the Beam workers (0s elapsed)"
    assert films(0, 10).startswith("ingest: 0/120 films, starting")
    # The rate counts from the first film, not from the workers' start-up.
    assert films(30, 10) == "ingest: 30/120 films, 3.0 films/s, ETA 30s"
    assert films(60, 10) == "ingest: 90/120 films, 4.5 films/s, ETA 7s"
    assert films(30, 5) == (
        "ingest: 120/120 films encoded, writing the shards (35s elapsed)"
    )
    clock.now += 25
    progress.stop()
    assert lines == ["ingest: 120/120 films in 1m00s, 4.8 films/s once the workers ran"]
    for worker in workers:
        worker.close()
    assert len(os.listdir(tmp_path)) == 2


def test_progress_is_logged_during_the_beam_job(tmp_path, caplog):
    data_dir = tmp_path / "data"
    make_tiny_data_dir(data_dir)
    caplog.set_level(logging.INFO, logger="absl")  # Whatever absl's verbosity.
    report = ingest.run_ingest(_config(data_dir, tmp_path / "records"))
    lines = [r.getMessage() for r in caplog.records if "films/s" in r.getMessage()]
    # 8 rows have a file and reach Beam: 4 written, 4 corrupt.
    assert lines[-1].startswith("ingest: 8/8 films in ")
    assert report["rows_written"] == 4


@pytest.mark.parametrize(
    "header",
    [
        "Image Index,Finding Label,Bbox [x,y,w,h],,,",
        "Image_Idx,Label,x,y,w,h",
        "\ufeffImage Index,Finding Label,x,y,w,h",
        None,  # no header: the first line is a box
    ],
)
def test_box_row_count_is_not_off_by_one_whatever_the_header(tmp_path, header):
    rows = ["00000001_000.png,Mass,1,2,3,4", "00000002_000.png,Mass,1,2,3,4"]
    lines = ([header] if header else []) + rows
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = []
    boxes = metadata.read_bbox_list(path, problems=problems)
    assert problems == []
    assert boxes["image_id"].tolist() == ["00000001_000.png", "00000002_000.png"]
    assert boxes["row"].tolist() == ([2, 3] if header else [1, 2])
