"""What is served is what was evaluated (issue: one home per contract).

End to end, films ingested at one size and trained at another: evaluate on
the records, predict on the raw films and the exported SavedModel give the
same probabilities. The pipeline's push exports the checkpoint its evaluation
scored. A probability-map pooling defined only here is treated as one by
evaluate, predict and export.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from cxr_tf import evaluate_lib
from cxr_tf import export_lib
from cxr_tf import model_dir as model_dir_lib
from cxr_tf import predict_lib
from cxr_tf import train_lib
from cxr_tf.data import images
from cxr_tf.data import ingest
from cxr_tf.data import preprocess
from cxr_tf.data import synthetic
from cxr_tf.models import ModelConfig

# The acceptance bound: mean absolute difference per film and finding.
MAX_MEAN_ABS_DIFF = 0.005


def _ingest(data_dir, out, size, **tables):
    ingest.run_ingest(
        ingest.IngestConfig(
            data_dir=str(data_dir),
            output_dir=str(out),
            image_size=size,
            running_mode="in_memory",
            max_skip_fraction=1.0,
            **tables,
        )
    )
    return out


def _train(records, model_dir, image_size, **overrides):
    args = dict(
        data_dir=str(records),
        model_dir=str(model_dir),
        model=ModelConfig(backbone="compact", pooling="pcam", image_size=image_size),
        batch_size=4,
        epochs=1,
        steps_per_epoch=3,
        validation_steps=1,
        learning_rate=3e-3,
        strategy="default",
        augment=False,
        backup_every_steps=1000,
        num_overlay_images=0,
        verbose=0,
    )
    args.update(overrides)
    return train_lib.train(train_lib.TrainConfig(**args))


def _jsonl(path):
    with open(path) as f:
        return {r["image"]: r for r in map(json.loads, f)}


def _served_probabilities(version_dir, paths):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    serve = loaded.signatures["serving_default"]
    out = {}
    for path in paths:
        data = pathlib.Path(path).read_bytes()
        out[os.path.basename(path)] = serve(image_bytes=tf.constant([data]))[
            "probabilities"
        ].numpy()[0]
    return out


def _check_three_paths(
    tmp_path, data_dir, image_dir, ingest_size, image_size, **tables
):
    records = _ingest(data_dir, tmp_path / "records", ingest_size, **tables)
    model_dir = tmp_path / "model"
    _train(records, model_dir, image_size)
    loaded = model_dir_lib.load(str(model_dir))
    assert loaded.ingest_size == ingest_size
    assert loaded.training_data["films"]["train"] > 0

    evaluate_lib.evaluate(
        evaluate_lib.EvalConfig(
            output_dir=str(tmp_path / "eval"),
            model_dir=str(model_dir),
            checkpoint="final",
            data_dir=str(records),
            val_split=None,
        )
    )
    evaluated = _jsonl(tmp_path / "eval" / predict_lib.PREDICTIONS_FILE)
    findings = list(loaded.findings)
    films = [os.path.join(image_dir, name) for name in sorted(evaluated)]
    assert len(films) >= 4

    predict_lib.predict(
        predict_lib.PredictConfig(
            model=str(model_dir), output_dir=str(tmp_path / "pred"), overlays=False
        ),
        films,
    )
    predicted = _jsonl(tmp_path / "pred" / predict_lib.PREDICTIONS_FILE)
    version = export_lib.export_saved_model(
        export_lib.ExportConfig(model_path=str(model_dir), export_dir=str(tmp_path / "x"))
    )
    served = _served_probabilities(version, films)

    def table(records_by_name):
        return np.array(
            [[records_by_name[n]["probabilities"][f] for f in findings] for n in sorted(evaluated)]
        )

    want = table(evaluated)
    got_predict = table(predicted)
    got_served = np.array([served[n] for n in sorted(evaluated)])
    figures = {
        "predict": float(np.abs(got_predict - want).mean()),
        "served": float(np.abs(got_served - want).mean()),
    }
    print(f"ingest {ingest_size} / train {image_size}: mean |diff| {figures}")
    assert figures["predict"] <= MAX_MEAN_ABS_DIFF, figures
    assert figures["served"] <= MAX_MEAN_ABS_DIFF, figures

    # The check can fail: the old path (shrinking raw films to the network
    # size, not the stored size) feeds the network other pixels.
    film = images.read_image(films[0])
    right = preprocess.preprocess_pixels(film, image_size, loaded.normalization, ingest_size)
    wrong = preprocess.preprocess_pixels(film, image_size, loaded.normalization, None)
    assert np.abs(right - wrong).max() * loaded.normalization.std > 4.0


@pytest.mark.slow
def test_ingest_512_train_128_same_probabilities_everywhere(tmp_path):
    data = tmp_path / "films"
    synthetic.generate_dataset(
        synthetic.SyntheticConfig(
            output_dir=str(data), num_patients=24, image_size=640, seed=5
        )
    )
    _check_three_paths(tmp_path, data, data / "images", 512, 128)


@pytest.mark.slow
def test_ingest_1024_train_512_same_probabilities_on_real_films(tmp_path, cxr14_sample):
    _check_three_paths(
        tmp_path,
        cxr14_sample,
        cxr14_sample / "images",
        1024,
        512,
        data_entry=str(cxr14_sample / "meta" / "Data_Entry_2017_v2020.csv"),
    )


@pytest.fixture(scope="module")
def small_records(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    synthetic.generate_dataset(
        synthetic.SyntheticConfig(
            output_dir=str(base / "films"), num_patients=24, image_size=64, seed=3
        )
    )
    return _ingest(base / "films", base / "records", 64)


@pytest.mark.slow
def test_pipeline_pushes_the_checkpoint_it_evaluated(tmp_path, small_records):
    from pipeline import evaluate as evaluate_step
    from pipeline import push as push_step

    model_dir = tmp_path / "model"
    _train(small_records, model_dir, 64)
    # A run whose last epoch is worse than its best: best.keras and
    # model.keras hold different weights.
    import keras

    best = keras.saving.load_model(str(model_dir / model_dir_lib.FINAL_MODEL))
    rng = np.random.default_rng(0)
    best.set_weights([w + rng.normal(0, 0.05, w.shape) for w in best.get_weights()])
    best.save(str(model_dir / model_dir_lib.BEST_CHECKPOINT))

    for step in ("evaluate", "push"):
        (tmp_path / step).mkdir()
    evaluation = evaluate_step.run_evaluate(
        str(tmp_path / "evaluate"), str(model_dir), str(small_records), str(tmp_path)
    )
    assert evaluation["blessed"], evaluation["reasons"]
    with open(evaluation["metrics"]) as f:
        metrics = json.load(f)
    evaluated_path = metrics["source"]["model"]
    assert evaluated_path.endswith(model_dir_lib.BEST_CHECKPOINT)
    pushed = push_step.run_push(
        str(tmp_path / "push"), str(model_dir), evaluation, str(tmp_path / "serving")
    )
    assert pushed["pushed"] and pushed["model"] == evaluated_path

    evaluated = _jsonl(
        pathlib.Path(evaluation["metrics"]).parent / predict_lib.PREDICTIONS_FILE
    )
    films = [
        str(small_records.parent / "films" / "images" / name) for name in sorted(evaluated)
    ]
    served = _served_probabilities(pushed["version_dir"], films)
    findings = list(model_dir_lib.load(evaluated_path).findings)
    want = np.array([[evaluated[n]["probabilities"][f] for f in findings] for n in sorted(evaluated)])
    got = np.array([served[n] for n in sorted(evaluated)])
    assert np.abs(got - want).mean() <= MAX_MEAN_ABS_DIFF

    # The final model gives other probabilities: the check tells them apart.
    final = model_dir_lib.load(str(model_dir), "final")
    pixels = np.stack(
        [
            preprocess.preprocess_pixels(
                images.read_image(p), 64, final.normalization, final.ingest_size
            )
            for p in films
        ]
    )
    final_probs = np.asarray(final.model(pixels, training=False)["probabilities"])
    assert np.abs(final_probs - want).mean() > 10 * np.abs(got - want).mean()

    with open(os.path.join(pushed["version_dir"], "assets", "model_card.json")) as f:
        card = json.load(f)
    assert card["source_model"] == evaluated_path
    assert card["metrics"]["classification"] == metrics["classification"]
    assert card["training_data"]["synthetic"] is True


def _tiny_model_dir(directory, pooling="lse"):
    from cxr_tf.data import schema
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model

    config = ModelConfig(image_size=64, pooling=pooling, backbone="compact")
    model_dir_lib.write_config(str(directory), config, schema.FINDINGS)
    build_model(config).save(os.path.join(directory, model_dir_lib.FINAL_MODEL))
    return directory


def test_export_refuses_metrics_of_another_model(tmp_path):
    loaded = model_dir_lib.load(str(_tiny_model_dir(tmp_path / "model")))
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps({"source": {"model": "elsewhere.keras", "model_sha256": "0" * 64}})
    )
    with pytest.raises(ValueError, match="not the model exported"):
        export_lib.read_metrics(loaded, str(metrics))
    # Metrics of this very file are accepted.
    metrics.write_text(
        json.dumps(
            {
                "source": {
                    "model": loaded.path,
                    "model_sha256": model_dir_lib.file_sha256(loaded.path),
                }
            }
        )
    )
    assert export_lib.read_metrics(loaded, str(metrics))["source"]["model"] == loaded.path


@pytest.mark.slow
def test_a_new_probability_map_pooling_is_treated_as_one_everywhere(
    tmp_path, small_records, monkeypatch
):
    """A pooling known only to this test: evaluate, predict and export ask
    its layer for the map kind; no name rule elsewhere guesses it."""
    from cxr_tf import choices
    from cxr_tf.data import schema
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model

    # A registry entry is all a pooling needs (CONTRIBUTING.md).
    monkeypatch.setitem(
        choices.POOLING_REGISTRY, "sigmoid_avg",
        "tests.test_contributing:SigmoidAveragePooling",
    )
    config = ModelConfig(image_size=64, pooling="sigmoid_avg", backbone="compact")
    model_dir = tmp_path / "model"
    model_dir_lib.write_config(
        str(model_dir), config, schema.FINDINGS,
        data=model_dir_lib.training_data(str(small_records)),
    )
    build_model(config).save(str(model_dir / model_dir_lib.FINAL_MODEL))
    with open(model_dir / model_dir_lib.CONFIG_FILE) as f:
        assert json.load(f)["map_kind"] == "probability"

    metrics = evaluate_lib.evaluate(
        evaluate_lib.EvalConfig(
            output_dir=str(tmp_path / "eval"),
            model_dir=str(model_dir),
            checkpoint="final",
            data_dir=str(small_records),
            val_split=None,
        )
    )
    assert metrics["source"]["map_kind"] == "probability"
    # Probability maps are boxed at 0.9, CAMs at 180 (and 60).
    assert set(metrics["localization"]) == {"0.9"}

    films = sorted((small_records.parent / "films" / "images").glob("*.png"))[:2]
    predict_lib.predict(
        predict_lib.PredictConfig(
            model=str(model_dir), output_dir=str(tmp_path / "pred"), overlays=False
        ),
        [str(p) for p in films],
    )
    records = _jsonl(tmp_path / "pred" / predict_lib.PREDICTIONS_FILE)
    assert {r["map_kind"] for r in records.values()} == {"probability"}

    version = export_lib.export_saved_model(
        export_lib.ExportConfig(model_path=str(model_dir), export_dir=str(tmp_path / "x"))
    )
    with open(os.path.join(version, "assets", "thresholds.json")) as f:
        thresholds = json.load(f)
    assert thresholds["map_kind"] == "probability"
    assert set(thresholds["thresholds"].values()) == {0.9}
