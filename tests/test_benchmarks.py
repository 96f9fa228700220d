"""Tests of benchmarks/train_step.py and its FLOP counter."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _conv_dense_model():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=True)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, use_bias=False)(x))


def test_forward_flops_counts_conv_and_matmul():
    # Conv: 2 * H * W * k * k * Cin * Cout multiply-adds plus one bias add per
    # output; Dense: 2 * C * units. Global pooling is not counted.
    conv = 2 * 16 * 16 * 3 * 3 * 3 * 8 + 16 * 16 * 8
    dense = 2 * 8 * 5
    flops = _common.forward_flops(_conv_dense_model(), (16, 16, 3))
    assert conv + dense <= flops <= conv + dense + 16 * 16 * 8 + 8


def test_forward_flops_rejects_unknown_shape():
    with pytest.raises(ValueError, match="input_shape"):
        _common.forward_flops(_conv_dense_model(), (None, 16, 3))


def test_run_interleaved_round_robin_and_summary():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    first, timed, cpu = _common.run_interleaved(fns, warmup=1, steps=2)
    assert calls == ["a", "b"] * 3
    assert len(first) == 2 and all(len(t) == 2 for t in timed + cpu)
    summary = _common.summarize(
        "train", [30.0, 10.0, 20.0], batch_size=2, cpu_ms=[8.0, 4.0, 6.0]
    )
    assert summary["train_cpu_ms_per_img"] == 3.0
    assert summary["train_ms_per_img"] == 10.0
    assert summary["train_step_ms_min"] == 10.0
    assert summary["train_step_ms"] == [30.0, 10.0, 20.0]


def _run_script(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_step.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    return proc


def test_train_step_script_prints_json():
    proc = _run_script(
        "--backbone=resnet34",
        "--pooling=pcam",
        "--image_size=32",
        "--batch_size=2",
        "--steps=1",
        "--warmup_steps=0",
        "--plain",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "train_ms_per_img",
        "infer_ms_per_img",
        "train_gflops_per_s",
        "infer_gflops_per_s",
        "forward_gflops_per_img",
        "train_gflops_per_img",
        "flops_convention",
        "threads",
        "load_avg_start",
    ):
        assert key in result, key
    assert (result["backbone"], result["pooling"]) == ("resnet34", "pcam")
    assert (result["size"], result["batch"], result["mode"]) == (32, 2, "plain")
    assert result["jit_compile"] is False
    assert result["train_ms_per_img"] > 0 and result["infer_ms_per_img"] > 0
    # ResNet-34 forward is 3.6 GMAC at 224 px; at 32 px (2.04% of the pixels)
    # about 0.15 GFLOP.
    assert 0.1 < result["forward_gflops_per_img"] < 0.2
    np.testing.assert_allclose(
        result["train_gflops_per_img"], 3 * result["forward_gflops_per_img"], 1e-2
    )


@pytest.mark.slow
def test_train_step_script_tuned_with_pooling_comparison():
    proc = _run_script(
        "--backbone=resnet34",
        "--image_size=32",
        "--batch_size=2",
        "--steps=2",
        "--compare_pooling=avg",
        "--noflops",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["mode"], result["onednn"], result["inter_op_threads"]) == (
        "tuned",
        "1",
        1,
    )
    compare = result["compare"]
    assert compare["pooling"] == "avg"
    assert len(compare["train_step_ms"]) == 2
    expected = 100.0 * (result["train_ms_per_img"] / compare["train_ms_per_img"] - 1)
    assert compare["pcam_extra_train_ms_pct"] == pytest.approx(expected, abs=0.2)
    assert "pcam_extra_infer_cpu_ms_pct" in compare


def test_train_step_script_rejects_bad_flag():
    proc = _run_script("--steps=0", "--noflops", "--notrain", "--noinfer")
    assert proc.returncode != 0
    assert "--steps must be >= 1" in proc.stderr


def test_classifier_probe_blocks_are_the_infomask_network_s():
    """The probe's "paper" block has the InfoMask classifier's convs."""
    from benchmarks import infomask_classifier_probe as probe
    from cxr_tf.models import infomask_net

    def kernels(model):
        return [
            tuple(layer.kernel.shape)
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]

    inputs = keras.Input((64, 64, 1))
    trunk = keras.Model(
        inputs, infomask_net.classifier_trunk(inputs, "group", width=0.25)
    )
    assert kernels(probe.build_block("paper_group", 64, 0.25)) == kernels(trunk)
    for name in ("paper_batch", "paperw1_batch", "deep_group", "deep_none"):
        model = probe.build_block(name, 64, 0.25)
        assert model.output_shape == (None, 14), name
    norms = {type(layer).__name__ for layer in probe.build_block("deep_batch", 64, 1).layers}
    assert "BatchNormalization" in norms and "GroupNormalization" not in norms
    # Behind the mask: the InfoMask layer's mask at the film's size.
    _, with_mask = probe.build_block("deep_batch", 64, 0.25, mask=True)
    assert [tuple(o.shape) for o in with_mask.outputs] == [(None, 14), (None, 64, 64, 1)]
    assert "infomask" in {layer.name for layer in with_mask.layers}
    # `width` scales the mask's encoder, not the deep block.
    narrow, _ = probe.build_block("deep_batch", 64, 0.25, mask=True)
    wide, _ = probe.build_block("deep_batch", 64, 1.0, mask=True)
    bare = probe.build_block("deep_batch", 64, 0.25)
    assert bare.count_params() < narrow.count_params() < wide.count_params()
    assert bare.count_params() == probe.build_block("deep_batch", 64, 1.0).count_params()
    # The compact ResNet trunk as the block and as the mask's encoder.
    compact = probe.build_block("compact_batch", 64, 1.0)
    assert compact.output_shape == (None, 14)
    _, compact_mask = probe.build_block(
        "compact_batch", 64, 0.25, mask=True, encoder="compact", variant="featuremask"
    )
    names = {layer.name for layer in compact_mask.layers}
    assert "encoder_stem_conv" in names and "classifier_stem_conv" in names, names
    assert compact_mask.get_layer("infomask").variant == "featuremask"
    with pytest.raises(SystemExit):
        probe.main(["--records", str(BENCHMARKS), "--blocks", "wide_group"])
    with pytest.raises(SystemExit):
        probe.main(["--records", str(BENCHMARKS), "--blocks", "compact_group"])
