"""Tests for cxr_tf.data.metadata on the real NIH tables and on planted bad rows."""


import numpy as np
import pandas as pd
import pytest

from cxr_tf.data import metadata
from cxr_tf.data import schema

NUM_IMAGES = 112_120


@pytest.fixture(scope="module")
def meta_dir(cxr14_sample):
    return cxr14_sample / "meta"


@pytest.fixture(scope="module")
def entries_v2020(meta_dir):
    return metadata.read_data_entry(meta_dir / "Data_Entry_2017_v2020.csv")


@pytest.fixture(scope="module")
def entries_2017(meta_dir):
    return metadata.read_data_entry(meta_dir / "Data_Entry_2017.csv")


@pytest.fixture(scope="module")
def official_lists(meta_dir):
    return (
        metadata.read_image_list(meta_dir / "train_val_list.txt"),
        metadata.read_image_list(meta_dir / "test_list.txt"),
    )


# --- Data_Entry ---------------------------------------------------------------


def test_v2020_table_parses(entries_v2020):
    entries, problems = entries_v2020
    assert len(entries) == NUM_IMAGES
    assert problems == []
    assert list(entries.columns) == list(metadata.ENTRY_COLUMNS)
    assert entries["image_id"].is_unique
    first = entries.iloc[0]
    assert first["image_id"] == "00000001_000.png"
    assert first["patient_id"] == "00000001"
    assert first["row"] == 2
    assert first["follow_up"] == 0
    assert first["sex"] == "M" and first["view_position"] == "PA"
    assert entries["patient_id"].str.fullmatch(r"\d{8}").all()
    assert (entries["patient_id"] == entries["image_id"].str[:8]).all()
    assert set(entries["view_position"]) == {"PA", "AP"}
    assert entries["age"].between(0, 120).all()


def test_2017_table_parses_with_crlf_trailing_comma_and_bad_ages(entries_2017):
    entries, problems = entries_2017
    assert len(entries) == NUM_IMAGES
    # The 16 ages over 100 (148..414) are reported, and their rows kept.
    assert len(problems) == 16
    for problem in problems:
        assert set(problem) == {"file", "row", "image_id", "reason", "dropped", "kind"}
        assert problem["kind"] == "invalid_age"
        assert problem["file"].endswith("Data_Entry_2017.csv")
        assert "implausible Patient Age" in problem["reason"]
        assert problem["dropped"] is False
        row = entries[entries["image_id"] == problem["image_id"]].iloc[0]
        assert row["row"] == problem["row"]
        assert np.isnan(row["age"])
    assert "'414'" in " ".join(p["reason"] for p in problems)
    assert entries["age"].isna().sum() == 16
    # No stray carriage returns from the CRLF line endings.
    assert not entries["view_position"].str.contains("\r").any()


def test_revisions_agree_on_labels(entries_v2020, entries_2017):
    new, old = entries_v2020[0], entries_2017[0]
    assert set(new["image_id"]) == set(old["image_id"])
    merged = new.merge(old, on="image_id", suffixes=("_new", "_old"))
    assert len(merged) == NUM_IMAGES
    assert (merged["finding_labels_new"] == merged["finding_labels_old"]).all()
    assert np.array_equal(
        np.stack(merged["labels_new"].to_list()),
        np.stack(merged["labels_old"].to_list()),
    )
    assert (merged["patient_id_new"] == merged["patient_id_old"]).all()


def test_labels_in_canonical_order(entries_v2020):
    entries = entries_v2020[0]
    labels = metadata.label_matrix(entries)
    assert labels.shape == (NUM_IMAGES, schema.NUM_FINDINGS)
    assert labels.dtype == np.int8
    no_finding = (entries["finding_labels"] == schema.NO_FINDING).to_numpy()
    assert not labels[no_finding].any()
    assert labels[~no_finding].sum(axis=1).min() == 1
    by_id = entries.set_index("image_id")
    got = by_id.loc["00000001_001.png", "labels"]  # Cardiomegaly|Emphysema
    expected = np.zeros(schema.NUM_FINDINGS, np.int8)
    expected[schema.FINDINGS.index("Cardiomegaly")] = 1
    expected[schema.FINDINGS.index("Emphysema")] = 1
    np.testing.assert_array_equal(got, expected)
    # Every name in the string is one set bit in its canonical column.
    for finding_labels, row in zip(entries["finding_labels"][:2000], labels[:2000]):
        names = [] if finding_labels == schema.NO_FINDING else finding_labels.split("|")
        assert sorted(schema.FINDINGS[i] for i in np.flatnonzero(row)) == sorted(names)
    # Prevalence of the v2020 table (docs/DATA_AND_METRICS.md): No Finding 53.8 %,
    # Infiltration 17.7 %, Hernia 0.2 %.
    prevalence = labels.mean(axis=0) * 100
    assert no_finding.mean() * 100 == pytest.approx(53.8, abs=0.1)
    assert prevalence[schema.FINDINGS.index("Infiltration")] == pytest.approx(
        17.7, abs=0.1
    )
    assert prevalence[schema.FINDINGS.index("Hernia")] == pytest.approx(0.2, abs=0.05)


def _write(tmp_path, name, text, newline="\n"):
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode())
    return path


HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
    "Patient Gender,View Position,OriginalImage[Width,Height],"
    "OriginalImagePixelSpacing[x,y]\n"
)


def test_bad_rows_are_reported_with_file_and_row(tmp_path):
    path = _write(
        tmp_path,
        "entries.csv",
        HEADER
        + "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"  # 2 ok
        + "00000001_001.png,Tumour,1,1,58,M,PA,2682,2749,0.143,0.143\n"  # 3 unknown
        + "00000001_000.png,Mass,2,1,58,M,PA,2682,2749,0.143,0.143\n"  # 4 dup
        + "00000002_000.png,Infiltrate|Mass,0,2,abc,F,AP,2500,2048,0.1,0.1\n"  # 5 age
        + "00000003_000.png,No Finding,0,3,045Y,F,AP,2500,2048,0.1,0.1\n"  # 6 ok
        + "00000004_000.png,Effusion,0,4,40\n"  # 7 too few fields
        + "00000005_000.png,,0,5,40,M,PA,1,1,0.1,0.1\n"  # 8 empty labels
        + "00000006_000.png,No Finding|Mass,0,6,40,M,PA,1,1,0.1,0.1\n"  # 9
        + "00000007_000.png,Edema,0,8,40,M,PA,1,1,0.1,0.1\n"  # 10 patient mismatch
        + "00000009_000.png,Hernia,x,9,40,M,PA,1,1,0.1,0.1\n",  # 11 follow-up
    )
    entries, problems = metadata.read_data_entry(path)
    by_row = {p["row"]: p for p in problems}
    assert sorted(by_row) == [3, 4, 5, 7, 8, 9, 10, 11]
    assert all(p["file"] == str(path) for p in problems)
    assert "unknown finding label 'Tumour'" in by_row[3]["reason"]
    assert by_row[3]["image_id"] == "00000001_001.png"
    assert "duplicate image id (first seen at row 2)" in by_row[4]["reason"]
    assert "malformed Patient Age 'abc'" in by_row[5]["reason"]
    assert "expected 11 fields, found 5" in by_row[7]["reason"]
    assert "empty Finding Labels" in by_row[8]["reason"]
    assert "No Finding" in by_row[9]["reason"]
    assert "does not match the image id prefix" in by_row[10]["reason"]
    assert "Follow-up" in by_row[11]["reason"]
    assert {r: p["kind"] for r, p in by_row.items()} == {
        3: "unknown_label",
        4: "duplicate",
        5: "invalid_age",
        7: "malformed_row",
        8: "invalid_label",
        9: "invalid_label",
        10: "patient_mismatch",
        11: "invalid_follow_up",
    }
    assert all(p["kind"] in metadata.PROBLEM_KINDS for p in problems)
    dropped = {r for r, p in by_row.items() if p["dropped"]}
    assert dropped == {3, 4, 7, 8, 9, 10}
    assert entries["row"].tolist() == [2, 5, 6, 11]
    by_id = entries.set_index("image_id")
    assert by_id.loc["00000001_000.png", "finding_labels"] == "Cardiomegaly"
    # Alias mapped to the canonical column; malformed age kept as NaN.
    row5 = by_id.loc["00000002_000.png"]
    assert row5["labels"][schema.FINDINGS.index("Infiltration")] == 1
    assert row5["labels"][schema.FINDINGS.index("Mass")] == 1
    assert np.isnan(row5["age"])
    assert by_id.loc["00000003_000.png", "age"] == 45.0
    assert by_id.loc["00000009_000.png", "follow_up"] == -1


def test_missing_column_is_refused(tmp_path):
    path = _write(tmp_path, "e.csv", "Image Index,Labels?\n00000001_000.png,Mass\n")
    with pytest.raises(ValueError, match="Patient ID"):
        metadata.read_data_entry(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        metadata.read_data_entry(tmp_path / "nope.csv")


# --- box list -----------------------------------------------------------------


BBOX_FILES = (
    "BBox_List_2017.csv",
    "variants/BBox_List_2017.excel_resaved.csv",
    "variants/BBox_List_2017.renamed_header.csv",
)


@pytest.fixture(scope="module")
def boxes(meta_dir):
    return {name: metadata.read_bbox_list(meta_dir / name) for name in BBOX_FILES}


def test_official_box_list(boxes, official_lists):
    df = boxes["BBox_List_2017.csv"]
    assert list(df.columns) == list(metadata.BBOX_COLUMNS)
    assert len(df) == 984
    assert df["image_id"].nunique() == 880
    assert set(df["finding"]) == set(schema.BOXED_FINDINGS)
    assert (df["finding"] == "Infiltration").sum() == 123
    assert (df[["w", "h"]] > 0).all().all()
    assert df["row"].tolist() == list(range(2, 986))
    first = df.iloc[0]
    assert first["image_id"] == "00013118_008.png"
    assert first["x"] == pytest.approx(225.084745762712)
    assert first["h"] == pytest.approx(79.1864406779661)
    # All boxed images are in the official test list.
    assert set(df["image_id"]) <= set(official_lists[1])


@pytest.mark.parametrize("variant", BBOX_FILES[1:])
def test_box_list_variants_match_official(boxes, variant):
    official = boxes["BBox_List_2017.csv"]
    other = boxes[variant]
    assert len(other) == len(official)
    assert (other["image_id"] == official["image_id"]).all()
    assert (other["finding"] == official["finding"]).all()
    # The spreadsheet re-save keeps 10 significant digits.
    np.testing.assert_allclose(
        other[["x", "y", "w", "h"]].to_numpy(),
        official[["x", "y", "w", "h"]].to_numpy(),
        rtol=1e-8,
        atol=1e-6,
    )


def test_bad_box_rows(tmp_path):
    path = _write(
        tmp_path,
        "boxes.csv",
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Infiltrate,1,2,3,4\n"
        "00000002_000.png,Tumour,1,2,3,4\n"
        "00000003_000.png,Mass,1,two,3,4\n"
        "00000004_000.png,Mass,1,2,0,4\n"
        "00000005_000.png,Mass,1,2,3\n",
        newline="\r\n",
    )
    with pytest.raises(
        ValueError, match=r"boxes.csv: 4 bad box row\(s\); first at row 3"
    ):
        metadata.read_bbox_list(path)
    problems = []
    df = metadata.read_bbox_list(path, problems=problems)
    assert df["image_id"].tolist() == ["00000001_000.png"]
    assert df["finding"].tolist() == ["Infiltration"]
    assert [p["row"] for p in problems] == [3, 4, 5, 6]
    assert "Tumour" in problems[0]["reason"]
    assert [p["kind"] for p in problems] == [
        "unknown_label",
        "invalid_box",
        "invalid_box",
        "malformed_row",
    ]
    assert all(p["file"] == str(path) and p["dropped"] for p in problems)


# --- image lists and splits -----------------------------------------------------


def test_official_lists(official_lists, meta_dir):
    train_val, test = official_lists
    assert len(train_val) == 86_524 and len(test) == 25_596
    # No final newline: the last id must still be whole.
    assert test[-1] == "00030805_000.png"
    assert not (meta_dir / "test_list.txt").read_bytes().endswith(b"\n")
    assert not set(train_val) & set(test)


def test_image_list_with_header_crlf_and_blank_lines(meta_dir, tmp_path):
    ids = metadata.read_image_list(meta_dir / "variants/jrzech_starter_images.csv")
    assert ids[:2] == ["00005425_000.png", "00001369_000.png"]
    assert "Image Index" not in ids and "" not in ids
    assert all(i.endswith(".png") and "\r" not in i for i in ids)
    dup = _write(tmp_path, "l.txt", "a.png\nb.png\na.png")
    with pytest.raises(ValueError, match=r"'a.png' is listed twice \(rows 1 and 3\)"):
        metadata.read_image_list(dup)


def test_official_split_is_patient_disjoint(entries_v2020, official_lists):
    entries = entries_v2020[0]
    train_val, test = official_lists
    metadata.check_patient_disjoint(entries, {"train_val": train_val, "test": test})
    splits = metadata.split_by_patient(
        entries, train_val, test, val_fraction=0.1, seed=0
    )
    test_set = set(test)
    assert splits["test"] == [i for i in entries["image_id"] if i in test_set]
    assert set(splits["train"]) | set(splits["val"]) == set(train_val)
    assert not set(splits["train"]) & set(splits["val"])
    patient = dict(zip(entries["image_id"], entries["patient_id"]))
    groups = {k: {patient[i] for i in v} for k, v in splits.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    n_pool = len(groups["train"] | groups["val"])
    assert len(groups["val"]) == round(0.1 * n_pool)


def test_split_by_patient_deterministic_per_seed(entries_v2020):
    entries = entries_v2020[0]
    a = metadata.split_by_patient(entries, seed=3)
    b = metadata.split_by_patient(entries, seed=3)
    c = metadata.split_by_patient(entries, seed=4)
    assert a == b
    assert a["val"] != c["val"] and a["test"] != c["test"]
    assert sum(len(v) for v in a.values()) == NUM_IMAGES
    patient = dict(zip(entries["image_id"], entries["patient_id"]))
    groups = {k: {patient[i] for i in v} for k, v in a.items()}
    n_patients = entries["patient_id"].nunique()
    assert len(groups["test"]) == round(0.2 * n_patients)
    assert len(groups["val"]) == round(0.1 * (n_patients - len(groups["test"])))
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"])
    assert not groups["val"] & groups["test"]


def test_planted_leak_names_patient(entries_v2020, official_lists):
    entries = entries_v2020[0]
    train_val, test = official_lists
    # Patient 00000001 is in train_val; plant one of its images in test.
    leaked = [i for i in train_val if i.startswith("00000001_")][0]
    with pytest.raises(ValueError, match=r"patient 00000001 in test and train_val"):
        metadata.check_patient_disjoint(
            entries, {"train_val": train_val, "test": test + [leaked]}
        )
    with pytest.raises(ValueError, match="patient 00000001 in"):
        metadata.split_by_patient(entries, train_val, test + [leaked])


def test_split_argument_errors(entries_v2020):
    entries = entries_v2020[0].head(50)
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \[0, 1\)"):
        metadata.split_by_patient(entries, val_fraction=1.5)
    with pytest.raises(ValueError, match="not in the metadata entries"):
        metadata.check_patient_disjoint(entries, {"train": ["nope.png"]})


def test_small_dataset_split_without_official_lists():
    entries = pd.DataFrame(
        {
            "image_id": [f"p{p}_{k}.png" for p in range(10) for k in range(3)],
            "patient_id": [f"p{p}" for p in range(10) for _ in range(3)],
        }
    )
    splits = metadata.split_by_patient(
        entries, val_fraction=0.2, test_fraction=0.2, seed=1
    )
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 18, "val": 6, "test": 6}
    metadata.check_patient_disjoint(entries, splits)
