"""ChestX-ray14 metadata: Data_Entry table, box list, official lists, patient splits.

The file formats and their quirks: docs/DATA_AND_METRICS.md, sections 3-5.
"""

import csv
import io
import pathlib
import re

import numpy as np
import pandas as pd

from cxr_tf import errors
from cxr_tf.data import schema

# Header names (lower-cased, spaces collapsed) accepted for each column.
_ENTRY_COLUMNS = {
    "image_id": ("image index", "image_id", "image id", "image"),
    "finding_labels": ("finding labels", "finding_labels", "labels"),
    "follow_up": ("follow-up #", "follow-up", "follow_up", "followup"),
    "patient_id": ("patient id", "patient_id"),
    "age": ("patient age", "age", "patient_age"),
    "sex": ("patient gender", "patient sex", "gender", "sex"),
    "view_position": ("view position", "view_position", "view"),
}
_REQUIRED_ENTRY_COLUMNS = ("image_id", "finding_labels", "patient_id")
# The NIH table's spelling of each required column, for messages.
_ENTRY_COLUMN_TITLES = {
    "image_id": "Image Index",
    "finding_labels": "Finding Labels",
    "patient_id": "Patient ID",
}
ENTRY_COLUMNS = (
    "image_id",
    "patient_id",
    "labels",
    "finding_labels",
    "follow_up",
    "age",
    "sex",
    "view_position",
    "row",
)
BBOX_COLUMNS = ("image_id", "finding", "x", "y", "w", "h", "row")

# Ages above this are data-entry errors (the 2017 table has 148..414).
MAX_PLAUSIBLE_AGE = 120.0
_NIH_IMAGE_ID = re.compile(r"^(\d{8})_\d{3}\.png$")
_IMAGE_LIST_HEADERS = (
    "image index",
    "image_id",
    "image id",
    "image",
    "filename",
    "path",
)
_AGE_UNITS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def _read_text(path, what):
    """Returns `(text, any_bad)`: bytes of `path` that are not UTF-8 become surrogates.

    `surrogateescape` keeps every other byte of a file with one bad byte, so
    the rows around it still parse; `_bad_bytes` finds the bad ones again.
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise errors.UserFileError(
            f"{what} not found", str(path), "check the path"
        ) from None
    except IsADirectoryError:
        raise errors.UserFileError(
            f"{what} is a folder, not a file", str(path), "pass the file's path"
        ) from None
    # A BOM that spreadsheet software may add.
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), True


# What `surrogateescape` makes of the bytes 0x80-0xff that are not UTF-8.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _bad_bytes(text):
    """Describes the non-UTF-8 bytes of `text` ("" when there are none)."""
    found = [f"0x{ord(c) - 0xDC00:02x}" for c in _ESCAPED_BYTE.findall(text)]
    if not found:
        return ""
    return "byte(s) " + ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")


def _replace_bad(text):
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read_rows(path):
    """Reads a CSV file: header, rows, line numbers and undecodable rows.

    Returns:
      `(header, rows, lines, bad)`: `header` the first non-blank row (bytes
      that are not UTF-8 replaced by U+FFFD), `rows` the later rows and
      `lines` their 1-based line numbers (blank lines skipped), `bad` a list
      of `(line, reason, fields)` for rows holding bytes that are not UTF-8
      (left out of `rows`; `fields` with those bytes replaced by U+FFFD).

    Raises:
      UserFileError: the file does not exist.
      UserValueError: the file is empty, or not CSV the reader can split.
    """
    text, any_bad = _read_text(path, "Metadata file")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = None
    rows, lines, bad = [], [], []
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if header is None:
                header = [_replace_bad(f) for f in fields]
                continue
            undecodable = any_bad and _bad_bytes("".join(fields))
            if undecodable:
                where = [i for i, f in enumerate(fields) if _bad_bytes(f)]
                bad.append(
                    (
                        reader.line_num,
                        f"not UTF-8 text: {undecodable} in field "
                        f"{', '.join(str(i + 1) for i in where)}; row left out",
                        [_replace_bad(f) for f in fields],
                    )
                )
                continue
            rows.append(fields)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise errors.UserValueError(
            f"unreadable CSV: {e}",
            f"{path}, line {reader.line_num}",
            "fix or remove that line",
        ) from None
    if header is None:
        raise errors.UserValueError(
            "the file is empty (no header row)", str(path), "pass the full table"
        )
    return header, rows, lines, bad


def _norm_name(name):
    return " ".join(name.strip().lower().split())


class PatientLeakError(errors.UserValueError):
    """A patient has images in two splits (e.g. in both official lists)."""


# `kind` of a problem: a stable code next to the human-readable `reason`.
PROBLEM_KINDS = (
    "malformed_row",
    "unknown_label",
    "invalid_label",
    "duplicate",
    "patient_mismatch",
    "invalid_age",
    "invalid_follow_up",
    "invalid_box",
)


def _problem(path, row, image_id, reason, dropped, kind):
    return {
        "file": str(path),
        "row": int(row),
        "image_id": image_id,
        "reason": reason,
        "dropped": bool(dropped),
        "kind": kind,
    }


def read_data_entry(path):
    """Reads a ChestX-ray14 `Data_Entry_2017*.csv` label table.

    Both circulating revisions parse: the v2020 table and the older one (CRLF
    line endings, trailing comma in the header). Columns are found by header
    name, so extra columns (original size, pixel spacing) are ignored.

    Args:
      path: path of the CSV file.

    Returns:
      `(entries, problems)`. `entries` is a `pandas.DataFrame` with columns
      `image_id` (str), `patient_id` (str, 8 digits zero-padded for numeric
      ids), `labels` (object column of `np.ndarray` int8 of shape (14,), in the
      order of `schema.FINDINGS`; "No Finding" is all zeros), `finding_labels`
      (str, as in the file), `follow_up` (int, -1 if missing), `age` (float,
      years, NaN if missing or implausible), `sex` (str), `view_position`
      (str) and `row` (1-based line of the file). `problems` is a list of
      dicts `{"file", "row", "image_id", "reason", "dropped", "kind"}` (`kind`
      one of `PROBLEM_KINDS`): rows that were
      left out (`dropped=True`: unknown or empty label, duplicate or malformed
      image id, malformed patient id, wrong field count, bytes that are not
      UTF-8) or kept with a field
      blanked (`dropped=False`: malformed or implausible age, malformed
      follow-up number).

    Raises:
      UserFileError: the file does not exist.
      UserValueError: the file is empty or lacks a required column (one
        line naming the file and the column).
    """
    header, rows, lines, undecodable = _read_rows(path)
    names = [_norm_name(h) for h in header]
    col_index = {}
    for key, aliases in _ENTRY_COLUMNS.items():
        for i, name in enumerate(names):
            if name in aliases:
                col_index[key] = i
                break
    missing = [k for k in _REQUIRED_ENTRY_COLUMNS if k not in col_index]
    if missing:
        wanted = ", ".join(repr(_ENTRY_COLUMN_TITLES[k]) for k in missing)
        needed = ", ".join(repr(t) for t in _ENTRY_COLUMN_TITLES.values())
        raise errors.UserValueError(
            f"the header lacks the required column(s) {wanted}",
            f"{path}, line 1",
            f"a Data_Entry table needs the columns {needed}; this header has "
            + ", ".join(repr(h) for h in header),
        )
    problems = []
    for line, reason, fields in undecodable:
        image_id = ""
        if len(fields) > col_index["image_id"]:
            image_id = fields[col_index["image_id"]].strip()
        if "\ufffd" in image_id:
            image_id = ""
        problems.append(_problem(path, line, image_id, reason, True, "malformed_row"))
    n_fields = max(col_index.values()) + 1
    # A trailing comma in the header adds an empty column the rows lack.
    n_header = len(header)
    while n_header > n_fields and not header[n_header - 1].strip():
        n_header -= 1
    good_rows, good_lines = [], []
    for fields, line in zip(rows, lines):
        extra = fields[n_header:]
        if len(fields) < n_fields or any(f.strip() for f in extra):
            problems.append(
                _problem(
                    path,
                    line,
                    (
                        fields[col_index["image_id"]].strip()
                        if len(fields) > col_index["image_id"]
                        else ""
                    ),
                    f"expected {n_header} fields, found {len(fields)}",
                    True,
                    "malformed_row",
                )
            )
            continue
        good_rows.append(fields[:n_fields])
        good_lines.append(line)
    raw = pd.DataFrame(good_rows, columns=range(n_fields), dtype=object)
    n = len(raw)

    def column(key, default=""):
        if key in col_index:
            # Arrow-backed strings make the vectorised str ops below fast.
            return raw[col_index[key]].astype("string[pyarrow]").str.strip()
        return pd.Series([default] * n, dtype="string[pyarrow]")

    df = pd.DataFrame(
        {
            "image_id": column("image_id"),
            "finding_labels": column("finding_labels"),
            "patient_raw": column("patient_id"),
            "age_raw": column("age"),
            "follow_raw": column("follow_up", "0"),
            "sex": column("sex"),
            "view_position": column("view_position"),
            "row": np.asarray(good_lines, dtype=np.int64),
        }
    )
    drop = np.zeros(n, dtype=bool)

    def report(mask, reason_fn, dropped, kind):
        for i in np.flatnonzero(mask):
            reason = reason_fn(i)
            row_kind = kind
            if isinstance(reason, tuple):
                row_kind, reason = reason
            problems.append(
                _problem(
                    path,
                    df["row"].iat[i],
                    df["image_id"].iat[i],
                    reason,
                    dropped,
                    row_kind,
                )
            )

    bad_id = (df["image_id"] == "").to_numpy()
    report(bad_id, lambda i: "empty Image Index", True, "malformed_row")
    drop |= bad_id

    # Patient ids: numeric ids are zero-padded to 8 digits as in the file names.
    pid = df["patient_raw"]
    numeric = pid.str.fullmatch(r"\d+").fillna(False).to_numpy(dtype=bool)
    bad_pid = (pid == "").to_numpy() | (
        ~numeric & ~pid.str.fullmatch(r"[A-Za-z0-9_.\-]+").fillna(False).to_numpy(bool)
    )
    report(
        bad_pid & ~drop,
        lambda i: f"malformed Patient ID {df['patient_raw'].iat[i]!r}",
        True,
        "malformed_row",
    )
    drop |= bad_pid
    df["patient_id"] = np.where(numeric, pid.str.zfill(8), pid)
    # For NIH file names the patient is also the first 8 digits of the image id.
    prefix = df["image_id"].str.extract(_NIH_IMAGE_ID, expand=False)
    mismatch = (prefix.notna() & (prefix != df["patient_id"])).to_numpy(bool)
    report(
        mismatch & ~drop,
        lambda i: (
            f"Patient ID {df['patient_raw'].iat[i]!r} does not match the image "
            f"id prefix {prefix.iat[i]!r}"
        ),
        True,
        "patient_mismatch",
    )
    drop |= mismatch

    labels, bad_label, label_reason = _parse_labels(df["finding_labels"])
    report(bad_label & ~drop, lambda i: label_reason[i], True, "invalid_label")
    drop |= bad_label

    # Duplicates: the first occurrence (of the rows still usable) is kept.
    dup = df["image_id"].duplicated(keep="first").to_numpy() & ~drop
    if dup.any():
        first_row = (
            df.loc[~drop].drop_duplicates("image_id").set_index("image_id")["row"]
        )
        report(
            dup,
            lambda i: (
                f"duplicate image id (first seen at row "
                f"{int(first_row.get(df['image_id'].iat[i], -1))})"
            ),
            True,
            "duplicate",
        )
    drop |= dup

    age, age_reason = _parse_age(df["age_raw"])
    report(
        (age_reason != "") & ~drop,
        lambda i: age_reason[i] + " (row kept, age set to NaN)",
        False,
        "invalid_age",
    )
    follow = pd.to_numeric(df["follow_raw"], errors="coerce")
    bad_follow = ~(follow.notna() & (follow >= 0) & (follow == np.floor(follow)))
    bad_follow = bad_follow.to_numpy(bool)
    report(
        bad_follow & ~drop,
        lambda i: (
            f"malformed Follow-up # {df['follow_raw'].iat[i]!r} "
            "(row kept, follow_up set to -1)"
        ),
        False,
        "invalid_follow_up",
    )
    follow_up = np.where(bad_follow, -1, follow.fillna(-1)).astype(np.int64)

    keep = ~drop
    label_rows = labels[keep]
    entries = pd.DataFrame(
        {
            "image_id": df["image_id"].to_numpy(object)[keep],
            "patient_id": df["patient_id"].to_numpy(object)[keep],
            "labels": pd.Series(list(label_rows), dtype=object),
            "finding_labels": df["finding_labels"].to_numpy(object)[keep],
            "follow_up": follow_up[keep],
            "age": age[keep],
            "sex": df["sex"].to_numpy(object)[keep],
            "view_position": df["view_position"].to_numpy(object)[keep],
            "row": df["row"].to_numpy()[keep],
        }
    )
    problems.sort(key=lambda p: p["row"])
    return entries, problems


def _parse_labels(finding_labels):
    """Returns (labels (N,14) int8, bad mask (N,), reasons) for a label column."""
    n = len(finding_labels)
    labels = np.zeros((n, schema.NUM_FINDINGS), dtype=np.int8)
    bad = np.zeros(n, dtype=bool)
    reasons = {}
    if n == 0:
        return labels, bad, reasons
    # One indicator column per distinct spelling; few distinct tokens, so the
    # per-token work below is tiny next to the vectorised split.
    dummies = finding_labels.str.get_dummies(sep="|")
    index_of = {name: i for i, name in enumerate(schema.FINDINGS)}
    no_finding = np.zeros(n, dtype=bool)
    n_tokens = np.zeros(n, dtype=np.int64)
    for token in dummies.columns:
        present = dummies[token].to_numpy(bool)
        name = token.strip()
        if name == "":
            continue
        n_tokens += present
        if name == schema.NO_FINDING:
            no_finding |= present
            continue
        canonical = schema.FINDING_ALIASES.get(name, name)
        if canonical in index_of:
            labels[present, index_of[canonical]] = 1
            continue
        bad |= present
        for i in np.flatnonzero(present):
            reasons.setdefault(
                i,
                (
                    "unknown_label",
                    f"unknown finding label {name!r} in {finding_labels.iat[i]!r} "
                    f"(expected {schema.NO_FINDING!r} or one of {schema.FINDINGS})",
                ),
            )
    empty = n_tokens == 0
    for i in np.flatnonzero(empty):
        reasons.setdefault(i, ("invalid_label", "empty Finding Labels"))
    contradictory = no_finding & (labels.sum(axis=1) > 0)
    for i in np.flatnonzero(contradictory):
        reasons.setdefault(
            i,
            (
                "invalid_label",
                f"{schema.NO_FINDING!r} together with findings: "
                f"{finding_labels.iat[i]!r}",
            ),
        )
    bad |= empty | contradictory
    return labels, bad, reasons


def _parse_age(age_raw):
    """Parses ages ("58", "058Y", "6M"); returns (years float, reasons str)."""
    years = pd.to_numeric(age_raw, errors="coerce").to_numpy(float, na_value=np.nan)
    # Only the few non-numeric values go through the (slower) unit regex.
    other = np.flatnonzero(np.isnan(years))
    if len(other):
        parts = (
            age_raw.iloc[other]
            .str.upper()
            .str.extract(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$")
        )
        value = pd.to_numeric(parts[0], errors="coerce").to_numpy(
            float, na_value=np.nan
        )
        unit = parts[1].fillna("").map(_AGE_UNITS).fillna(1.0).to_numpy(float)
        years[other] = value * unit
    missing = (age_raw == "").to_numpy(bool)
    malformed = np.isnan(years) & ~missing
    implausible = ~np.isnan(years) & (years > MAX_PLAUSIBLE_AGE)
    reasons = np.full(len(age_raw), "", dtype=object)
    raw = age_raw.to_numpy(object)
    for i in np.flatnonzero(malformed):
        reasons[i] = f"malformed Patient Age {raw[i]!r}"
    for i in np.flatnonzero(implausible):
        reasons[i] = (
            f"implausible Patient Age {raw[i]!r} (more than {MAX_PLAUSIBLE_AGE:g})"
        )
    years[malformed | implausible] = np.nan
    return years, reasons


def label_matrix(entries):
    """Stacks the `labels` column of `read_data_entry` into an (N, 14) int8 array."""
    if len(entries) == 0:
        return np.zeros((0, schema.NUM_FINDINGS), dtype=np.int8)
    return np.stack(entries["labels"].to_list()).astype(np.int8, copy=False)


def _is_box_header(fields):
    """Whether the first row of a box list is its header, not a box.

    A known first column name ("Image Index") is a header; so is a row whose
    first field is not an image file name and whose four box fields are all
    non-numeric ("Image_Idx,Label,x,y,w,h"), so a renamed header is not
    counted as a bad box row.
    """
    if not fields:
        return False
    if _norm_name(fields[0]) in _IMAGE_LIST_HEADERS:
        return True
    if re.search(r"\.(png|jpe?g|dcm|dicom)$", fields[0].strip().lower()):
        return False

    def numeric(text):
        try:
            float(text)
        except ValueError:
            return False
        return True

    return len(fields) >= 6 and not any(numeric(f) for f in fields[2:6])


def read_bbox_list(path, problems=None):
    """Reads a ChestX-ray14 box list (`BBox_List_2017.csv` and its variants).

    Columns are taken by position (image, finding, x, y, w, h), so renamed
    headers ("Bbox x", ...) and spreadsheet re-saves (CRLF, fewer decimals,
    no trailing empty columns) read the same. Finding names are mapped to
    `schema.FINDINGS` ("Infiltrate" -> "Infiltration").

    Args:
      path: path of the CSV file.
      problems: optional list. When given, bad rows are appended to it as
        `{"file", "row", "image_id", "reason", "dropped": True, "kind"}` and
        left out; when None a bad row raises.

    Returns:
      A `pandas.DataFrame` with columns `image_id`, `finding` (canonical
      name), `x`, `y`, `w`, `h` (float, pixels of the 1024x1024 image, x, y
      the top-left corner) and `row` (1-based line of the file).

    Raises:
      UserFileError: the file does not exist.
      UserValueError: the file is empty, or (with `problems=None`) a row has an
        unknown finding, a non-numeric or non-positive size, or a wrong
        number of fields; the message names the file and row.
    """
    header, rows, lines, undecodable = _read_rows(path)
    if not _is_box_header(header):
        # No header: the first line is a box.
        rows.insert(0, header)
        lines.insert(0, 1)
    out = []
    bad = [
        _problem(
            path, line, "" if "\ufffd" in f[0] else f[0].strip(), reason, True,
            "malformed_row",
        )
        for line, reason, f in undecodable
    ]
    for fields, line in zip(rows, lines):
        image_id = fields[0].strip()
        reason = None
        kind = "malformed_row"
        if len(fields) < 6 or any(f.strip() for f in fields[6:]):
            reason = (
                f"expected 6 fields (image, finding, x, y, w, h), found {len(fields)}"
            )
        elif not image_id:
            reason = "empty Image Index"
        else:
            try:
                finding = schema.canonical_finding(fields[1])
            except ValueError:
                reason = f"unknown finding label {fields[1].strip()!r}"
                kind = "unknown_label"
            else:
                try:
                    x, y, w, h = (float(f) for f in fields[2:6])
                except ValueError:
                    reason = f"non-numeric box {fields[2:6]!r}"
                    kind = "invalid_box"
                else:
                    if (
                        not all(np.isfinite(v) for v in (x, y, w, h))
                        or w <= 0
                        or h <= 0
                    ):
                        reason = f"invalid box x={x}, y={y}, w={w}, h={h}"
                        kind = "invalid_box"
        if reason is not None:
            bad.append(_problem(path, line, image_id, reason, True, kind))
            continue
        out.append((image_id, finding, x, y, w, h, line))
    if bad:
        bad.sort(key=lambda p: p["row"])
        if problems is None:
            first = bad[0]
            raise errors.UserValueError(
                f"{path}: {len(bad)} bad box row(s); first at row {first['row']}: "
                f"{first['reason']} (image {first['image_id']!r})",
                fix="fix or remove those rows",
            )
        problems.extend(bad)
    df = pd.DataFrame(out, columns=list(BBOX_COLUMNS))
    df = df.astype({"x": float, "y": float, "w": float, "h": float, "row": np.int64})
    return df


def read_image_list(path):
    """Reads an image list such as `train_val_list.txt` / `test_list.txt`.

    One image id per line; CRLF, a missing final newline, blank lines and a
    one-line header ("Image Index") are accepted; for CSV lines the first
    field is taken.

    Args:
      path: path of the text file.

    Returns:
      The image ids, in file order.

    Raises:
      UserFileError: the file does not exist.
      UserValueError: an image id is listed twice, or a line is not UTF-8
        (names the file and rows).
    """
    text, _ = _read_text(path, "Image list")
    ids = []
    seen = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        image_id = line.split(",", 1)[0].strip()
        if not image_id:
            continue
        undecodable = _bad_bytes(line)
        if undecodable:
            # Dropping the line could move an official test image into
            # training, so a damaged list stops the job.
            raise errors.UserValueError(
                f"not UTF-8 text ({undecodable}): {_replace_bad(line)!r}",
                f"{path}, line {line_no}",
                "fix the image id on that line (the list decides the splits)",
            )
        if not ids and not seen and _norm_name(image_id) in _IMAGE_LIST_HEADERS:
            continue
        if image_id in seen:
            raise errors.UserValueError(
                f"image id {image_id!r} is listed twice (rows "
                f"{seen[image_id]} and {line_no})",
                str(path),
                "list each image once",
            )
        seen[image_id] = line_no
        ids.append(image_id)
    return ids


def _patients_of(entries):
    """Returns {image id: patient id} (first row wins for a repeated id)."""
    image_ids = entries["image_id"].to_numpy(object).tolist()
    patients = entries["patient_id"].to_numpy(object).tolist()
    mapping = {}
    for image_id, patient in zip(image_ids, patients):
        mapping.setdefault(image_id, patient)
    return mapping


def _member(values, ids):
    """Boolean mask: which of `values` are in the iterable `ids`."""
    ids = ids if isinstance(ids, (set, frozenset)) else set(ids)
    return np.fromiter((v in ids for v in values), dtype=bool, count=len(values))


def _draw_patients(patients, fraction, rng):
    """Returns a set of about `fraction` of the (sorted) `patients`."""
    patients = np.asarray(sorted(patients), dtype=object)
    if fraction <= 0 or len(patients) == 0:
        return set()
    count = int(round(fraction * len(patients)))
    if count == 0 and len(patients) > 1:
        count = 1
    count = min(count, len(patients) - 1) if len(patients) > 1 else count
    chosen = rng.permutation(len(patients))[:count]
    return set(patients[chosen].tolist())


def split_by_patient(
    entries,
    train_val_ids=None,
    test_ids=None,
    val_fraction=0.1,
    test_fraction=0.2,
    seed=0,
):
    """Splits images into train / val / test so that no patient is in two splits.

    The test split is the official list when `test_ids` is given, else a
    random `test_fraction` of the patients. Validation patients are a random
    `val_fraction` of the patients of the train/val pool (`train_val_ids`, or
    every image not in test). Fractions count patients, not images. Only
    images present in `entries` are assigned (the official lists cover the
    whole data set, `entries` may be a subset); with both lists given, an
    image in neither list is left out of every split.

    Args:
      entries: DataFrame from `read_data_entry` (`image_id`, `patient_id`).
      train_val_ids: optional official train/val image ids.
      test_ids: optional official test image ids.
      val_fraction: fraction of train/val patients drawn for validation.
      test_fraction: fraction of patients drawn for test when `test_ids` is
        None.
      seed: seed of the random draw; the same seed gives the same split.

    Returns:
      `{"train": [...], "val": [...], "test": [...]}` image ids, each in the
      order of `entries`.

    Raises:
      ValueError: a fraction is outside [0, 1).
      PatientLeakError: the split puts a patient in two splits (the lists
        given disagree; names the patients and splits).
    """
    for name, value in (
        ("val_fraction", val_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value!r}")
    rng = np.random.default_rng(seed)
    # Plain Python sets: much faster than pandas isin on arrow strings.
    image_ids = entries["image_id"].to_numpy(object)
    patients = entries["patient_id"].to_numpy(object)
    in_train_val = (
        _member(image_ids, train_val_ids) if train_val_ids is not None else None
    )
    if test_ids is not None:
        is_test = _member(image_ids, test_ids)
    else:
        pool = (
            in_train_val if in_train_val is not None else np.ones(len(image_ids), bool)
        )
        test_patients = _draw_patients(set(patients[pool]), test_fraction, rng)
        is_test = pool & _member(patients, test_patients)
    is_pool = ~is_test if in_train_val is None else in_train_val & ~is_test
    val_patients = _draw_patients(set(patients[is_pool]), val_fraction, rng)
    is_val = is_pool & _member(patients, val_patients)
    splits = {
        "train": image_ids[is_pool & ~is_val].tolist(),
        "val": image_ids[is_val].tolist(),
        "test": image_ids[is_test].tolist(),
    }
    check_patient_disjoint(entries, splits)
    return splits


def check_patient_disjoint(entries, splits, max_listed=10):
    """Raises if a patient (or an image) has images in more than one split.

    Args:
      entries: DataFrame with `image_id` and `patient_id`.
      splits: mapping split name -> iterable of image ids.
      max_listed: how many offending patients the message lists.

    Raises:
      ValueError: a split names an image missing from `entries`.
      PatientLeakError: a patient's images are in two or more splits; the
        message names the patients, their splits and images.
    """
    patient_of = _patients_of(entries)
    frames = []
    for split, ids in splits.items():
        ids = list(ids)
        unknown = [i for i in ids if i not in patient_of]
        if unknown:
            raise ValueError(
                f"Split {split!r} lists {len(unknown)} image(s) not in the metadata "
                f"entries, e.g. {unknown[:5]}."
            )
        frames.append(
            pd.DataFrame(
                {
                    "image_id": np.asarray(ids, dtype=object),
                    "patient_id": np.asarray(
                        [patient_of[i] for i in ids], dtype=object
                    ),
                    "split": split,
                }
            )
        )
    if not frames:
        return
    splits_of = {}
    for frame in frames:
        split = frame["split"].iat[0] if len(frame) else None
        for patient in set(frame["patient_id"].tolist()):
            splits_of.setdefault(patient, set()).add(split)
    leaked = sorted(p for p, names in splits_of.items() if len(names) > 1)
    if not leaked:
        return
    table = pd.concat(frames, ignore_index=True)
    table = table[table["patient_id"].isin(leaked[:max_listed])]
    described = []
    for patient in leaked[:max_listed]:
        rows = table[table["patient_id"] == patient]
        parts = [
            f"{split}: {', '.join(group['image_id'].head(3))}"
            + (" ..." if len(group) > 3 else "")
            for split, group in rows.groupby("split", sort=True)
        ]
        described.append(
            f"patient {patient} in {' and '.join(sorted(set(rows['split'])))} ({'; '.join(parts)})"
        )
    more = f" and {len(leaked) - max_listed} more" if len(leaked) > max_listed else ""
    raise PatientLeakError(
        f"{len(leaked)} patient(s) appear in more than one split (patient-wise "
        f"splits are required): " + "; ".join(described) + more,
        fix="list each patient's images in one split only",
    )
