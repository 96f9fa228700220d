"""Tests of cxr_tf.data.synthetic: layout, determinism, true boxes, difficulty."""

import csv
import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxr_tf.data import schema
from cxr_tf.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
NAME_RE = re.compile(r"^\d{8}_\d{3}\.png$")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    config = synthetic.SyntheticConfig(
        output_dir=str(out), num_patients=12, image_size=64, seed=3
    )
    summary = synthetic.generate_dataset(config)
    return out, summary


def _boxed_specs(count, seed=0):
    specs = synthetic.sample_specs(120, seed=seed)
    return [s for s in specs if any(f in schema.BOXED_FINDINGS for f in s.findings)][
        :count
    ]


def test_prevalence_real_is_the_table():
    real = synthetic.finding_prevalence("real")
    assert real == synthetic.REAL_PREVALENCE
    assert list(real) == list(schema.FINDINGS)
    assert real["Hernia"] == pytest.approx(0.002)


def test_prevalence_boosted_keeps_order_and_floor():
    real = synthetic.finding_prevalence("real")
    boosted = synthetic.finding_prevalence("boosted", min_prevalence=0.08)
    assert min(boosted.values()) == pytest.approx(0.08)
    for f in schema.FINDINGS:
        assert boosted[f] >= min(real[f], 0.08) - 1e-12
        if real[f] >= 0.08:
            assert boosted[f] == real[f]
    order_real = sorted(schema.FINDINGS, key=lambda f: (real[f], f))
    order_boosted = sorted(schema.FINDINGS, key=lambda f: (boosted[f], f))
    assert order_real == order_boosted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prevalence": "uniform"}, "prevalence"),
        ({"min_prevalence": 0.0}, "min_prevalence"),
        ({"num_patients": 0}, "num_patients"),
        ({"image_size": 16}, "image_size"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"num_workers": 0}, "num_workers"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.SyntheticConfig(output_dir="x", **kwargs)


def test_real_mode_label_statistics():
    specs = synthetic.sample_specs(1200, seed=7, prevalence="real")
    labels = np.array([[f in s.findings for f in schema.FINDINGS] for s in specs])
    counts = labels.sum(axis=1)
    assert abs((counts == 0).mean() - synthetic.REAL_NO_FINDING) < 0.04
    assert abs((counts > 1).mean() - 0.185) < 0.035
    real = np.array(list(synthetic.REAL_PREVALENCE.values()))
    assert np.all(np.abs(labels.mean(axis=0) - real) < 0.025)
    views = np.mean([s.view_position == "AP" for s in specs])
    assert 0.32 < views < 0.48
    assert 1.5 < len(specs) / 1200 < 1.9


def test_patient_stream_is_independent_of_set_size():
    few = synthetic.sample_specs(3, seed=5)
    many = synthetic.sample_specs(9, seed=5)
    assert [s.image_id for s in few] == [s.image_id for s in many[: len(few)]]
    a, _ = synthetic.render_film(few[-1], 64)
    b, _ = synthetic.render_film(many[len(few) - 1], 64)
    np.testing.assert_array_equal(a, b)


def test_layout_matches_the_real_files(tiny_set, cxr14_sample):
    out, summary = tiny_set
    real_header = (
        (cxr14_sample / "meta" / "Data_Entry_2017_v2020.csv")
        .open()
        .readline()
        .rstrip("\n")
    )
    entry_text = (out / "Data_Entry_2017.csv").read_text()
    assert entry_text.splitlines()[0] == real_header
    real_bbox_header = (
        (cxr14_sample / "meta" / "BBox_List_2017.csv").open().readline().rstrip("\n")
    )
    bbox_lines = (out / "BBox_List_2017.csv").read_text().splitlines()
    assert bbox_lines[0] == real_bbox_header
    assert "\r" not in entry_text

    rows = list(csv.reader(io.StringIO(entry_text)))[1:]
    assert len(rows) == summary["num_images"]
    image_ids = [r[0] for r in rows]
    for r in rows:
        assert len(r) == 11
        assert NAME_RE.match(r[0]), r[0]
        assert int(r[3]) == int(r[0][:8])  # unpadded Patient ID, as v2020
        assert r[5] in ("M", "F") and r[6] in ("PA", "AP")
        if r[1] != schema.NO_FINDING:
            names = r[1].split("|")
            assert names == sorted(names)
            assert all(n in schema.FINDINGS for n in names)

    for line in bbox_lines[1:]:
        fields = line.split(",")
        assert len(fields) == 6
        assert fields[0] in image_ids
        assert fields[1] != "Infiltration"
        assert schema.canonical_finding(fields[1]) in schema.BOXED_FINDINGS
        x, y, w, h = map(float, fields[2:])
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= 64 and y + h <= 64

    train_val = (out / "train_val_list.txt").read_text()
    test = (out / "test_list.txt").read_text()
    assert not train_val.endswith("\n") and not test.endswith("\n")
    train_val, test = train_val.split("\n"), test.split("\n")
    assert sorted(train_val + test) == sorted(image_ids)
    assert not {i[:8] for i in train_val} & {i[:8] for i in test}
    assert len(test) == summary["test_images"] > 0

    for image_id in image_ids[:5]:
        with Image.open(out / "images" / image_id) as im:
            assert im.mode == "L" and im.size == (64, 64) and im.format == "PNG"


def test_same_arguments_same_bytes(tiny_set, tmp_path):
    out, _ = tiny_set
    config = synthetic.SyntheticConfig(
        output_dir=str(tmp_path), num_patients=12, image_size=64, seed=3
    )
    synthetic.generate_dataset(config)
    for name in ("Data_Entry_2017.csv", "BBox_List_2017.csv", "test_list.txt"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()
    for path in sorted((out / "images").iterdir()):
        assert path.read_bytes() == (tmp_path / "images" / path.name).read_bytes()
    other = synthetic.sample_specs(1, seed=4)[0]
    same = synthetic.sample_specs(1, seed=3)[0]
    assert not np.array_equal(
        synthetic.render_film(other, 64)[0], synthetic.render_film(same, 64)[0]
    )


def test_box_list_matches_rendered_lesions(tiny_set):
    out, _ = tiny_set
    specs = synthetic.sample_specs(12, seed=3, image_size=64)
    expected = []
    for spec in specs:
        _, masks = synthetic.render_film(spec, 64)
        for finding, x, y, w, h in synthetic.film_boxes(spec, masks):
            label = "Infiltrate" if finding == "Infiltration" else finding
            expected.append([spec.image_id, label] + [float(v) for v in (x, y, w, h)])
    with open(out / "BBox_List_2017.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    got = [r[:2] + [float(v) for v in r[2:]] for r in rows]
    assert got == expected
    boxed = sum(
        1 for s in specs for les in s.lesions if les.finding in schema.BOXED_FINDINGS
    )
    assert len(got) == boxed  # every boxed lesion drawn and boxed


def test_boxes_are_tight_around_drawn_lesions():
    size = 96
    specs = _boxed_specs(14)
    assert len(specs) == 14
    seen = set()
    for spec in specs:
        with_lesions, masks = synthetic.render_film(spec, size)
        without, _ = synthetic.render_film(spec, size, include_lesions=False)
        diff = np.abs(with_lesions.astype(int) - without.astype(int))
        drawn = np.zeros((size, size), bool)
        for lesion, mask in zip(spec.lesions, masks):
            drawn |= mask
            if lesion.finding not in schema.BOXED_FINDINGS:
                continue
            seen.add(lesion.finding)
            x, y, w, h = synthetic.mask_to_box(mask)
            # Tight: the box holds the whole mask and each edge touches it.
            assert mask[y : y + h, x : x + w].sum() == mask.sum() > 0
            assert mask[y, x : x + w].any() and mask[y + h - 1, x : x + w].any()
            assert mask[y : y + h, x].any() and mask[y : y + h, x + w - 1].any()
            # Drawn: the film changes inside the lesion's pixels.
            assert diff[mask].mean() > 2.0, (spec.image_id, lesion.finding)
        # Nothing changes outside the lesions but noise (grown by 2 pixels).
        grown = drawn.copy()
        for axis in (0, 1):
            for shift in (-2, -1, 1, 2):
                grown |= np.roll(drawn, shift, axis=axis)
        outside = diff[~grown]
        assert outside.size == 0 or np.percentile(outside, 99) <= 8
    assert len(seen) >= 5


def test_box_sizes_follow_the_real_medians():
    size = 128
    specs = synthetic.sample_specs(260, seed=11)
    sizes = {f: [] for f in schema.BOXED_FINDINGS}
    for spec in specs:
        wanted = [f for f in spec.findings if f in sizes and len(sizes[f]) < 6]
        if not wanted:
            continue
        _, masks = synthetic.render_film(spec, size)
        for finding, _, _, w, h in synthetic.film_boxes(spec, masks):
            if finding in wanted:
                sizes[finding].append((w * 1024 / size, h * 1024 / size))
    for finding, boxes in sizes.items():
        assert len(boxes) >= 4, finding
        w, h = np.median(np.array(boxes), axis=0)
        real_w, real_h = synthetic.REAL_BOX_MEDIANS[finding][:2]
        assert 0.45 < w / real_w < 2.0, (finding, w, real_w)
        assert 0.45 < h / real_h < 2.0, (finding, h, real_h)


@pytest.mark.slow
def test_logistic_regression_on_32px_stays_below_075_auc():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    size = 64
    specs = synthetic.sample_specs(360, seed=21, image_size=size)
    pixels, labels = [], []
    for spec in specs:
        image, _ = synthetic.render_film(spec, size)
        small = Image.fromarray(image).resize((32, 32), Image.BILINEAR)
        pixels.append(np.asarray(small, np.float32).ravel() / 255.0)
        labels.append([f in spec.findings for f in schema.FINDINGS])
    x, y = np.array(pixels), np.array(labels, int)
    test = np.array([s.patient_id % 5 == 0 for s in specs])
    mean, std = x[~test].mean(0), x[~test].std(0) + 1e-6
    x = (x - mean) / std
    aucs = []
    for k in range(schema.NUM_FINDINGS):
        if y[~test, k].sum() < 3 or len(set(y[test, k])) < 2:
            continue
        model = LogisticRegression(C=0.01, max_iter=500).fit(x[~test], y[~test, k])
        aucs.append(roc_auc_score(y[test, k], model.decision_function(x[test])))
    assert len(aucs) >= 12
    assert np.mean(aucs) < 0.75, aucs


def test_contact_sheet_from_set_and_on_the_fly(tiny_set, tmp_path):
    out, _ = tiny_set
    path = synthetic.make_contact_sheet(
        tmp_path / "sheet.png", data_dir=out, num_films=4, image_size=64, columns=2
    )
    with Image.open(path) as im:
        assert im.size == (128, 128)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # Coloured box outlines are drawn on the grayscale films.
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).any()
    path = synthetic.make_contact_sheet(
        tmp_path / "fly.png", num_films=3, image_size=64, columns=3
    )
    with Image.open(path) as im:
        assert im.size == (192, 64)
    with pytest.raises(FileNotFoundError, match="Data_Entry"):
        synthetic.make_contact_sheet(tmp_path / "x.png", data_dir=tmp_path / "none")


def test_import_parses_no_flags():
    from absl import flags

    assert "num_patients" not in flags.FLAGS
    assert "contact_sheet" not in flags.FLAGS


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "cxr_tf.data.synthetic", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_run_flagfile_and_helpfull(tmp_path):
    flagfile = tmp_path / "synth.flags"
    flagfile.write_text(
        f"--output_dir={tmp_path / 'set'}\n--num_patients=3\n--image_size=48\n"
        "--seed=2\n--prevalence=real\n"
    )
    result = _cli([f"--flagfile={flagfile}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"num_images"' in result.stdout
    entries = (tmp_path / "set" / "Data_Entry_2017.csv").read_text().splitlines()
    assert len(entries) > 3
    assert len(list((tmp_path / "set" / "images").iterdir())) == len(entries) - 1
    assert (
        '"prevalence": "real"'
        in (tmp_path / "set" / "synthetic_config.json").read_text()
    )

    sheet = tmp_path / "sheet.png"
    result = _cli(
        [f"--contact_sheet={sheet}", f"--output_dir={tmp_path / 'set'}"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sheet.is_file()

    result = _cli(["--helpfull"], tmp_path)
    # absl prints the help and exits with status 1.
    assert result.returncode in (0, 1)
    assert "--min_prevalence" in result.stdout and "--flagfile" in result.stdout

    result = _cli(["--num_patients=2"], tmp_path)
    assert result.returncode != 0
    assert "--output_dir is required" in result.stderr


class _FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_are_time_based_with_rate_and_eta():
    clock, lines = _FakeClock(), []
    progress = synthetic.Progress(
        100, "films", interval=15.0, clock=clock, log=lambda f, a: lines.append(a)
    )
    for done in range(1, 40):
        clock.now += 0.5  # 2 films/s
        progress.update(done)
    # 19.5 s for 39 films: one line, once 15 s had passed (film 30).
    assert lines == ["films 30 / 100 (30%), 2.0 films/s, ETA 35 s"]
    clock.now += 16.0  # a stall: nothing finishes, the tick still reports
    progress.tick()
    assert len(lines) == 2 and lines[1].startswith("films 39 / 100 (39%)")
    progress.tick()  # not yet another interval
    assert len(lines) == 2
    clock.now += 1.0
    progress.update(100)  # the end is always reported
    assert lines[-1] == "films 100 / 100 (100%), 2.7 films/s, done in 36 s"
    assert synthetic.PROGRESS_INTERVAL_S < 15.0


@pytest.mark.parametrize("workers", [1, 2])
def test_generate_dataset_logs_progress(tmp_path, monkeypatch, workers):
    lines = []
    monkeypatch.setattr(synthetic, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(
        synthetic.logging, "info", lambda fmt, *args: lines.append(fmt % args)
    )
    config = synthetic.SyntheticConfig(
        output_dir=str(tmp_path), num_patients=4, image_size=32, seed=3,
        num_workers=workers,
    )  # fmt: skip
    summary = synthetic.generate_dataset(config)
    progress = [l for l in lines if l.startswith("films ")]
    total = summary["num_images"]
    # Interval 0: a line for each film done (each chunk of 8 from the pool),
    # plus waiting ticks in the pool.
    done = sorted({int(l.split()[1]) for l in progress} - {0})
    assert done == (list(range(1, total + 1)) if workers == 1 else [total])
    assert all("films/s" in l and ("ETA" in l or "done in" in l) for l in progress)
    assert progress[-1].startswith(f"films {total} / {total} (100%)")
    assert "done in" in progress[-1]
    # The pool returns the films' boxes in order: the same box list.
    if workers == 2:
        serial = tmp_path / "serial"
        synthetic.generate_dataset(
            synthetic.SyntheticConfig(
                output_dir=str(serial), num_patients=4, image_size=32, seed=3
            )
        )
        assert (tmp_path / synthetic.BBOX_FILE).read_text() == (
            serial / synthetic.BBOX_FILE
        ).read_text()
