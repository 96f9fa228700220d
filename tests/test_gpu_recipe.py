"""The README's GPU recipe: every command parses, resolves and trains on a CPU.

The commands are read from the README's `gpu-recipe` block, so the README
and this test cannot drift. On a CPU each command runs as written with its
data and model folders replaced, a few steps at 64 px (`CPU_CUTS`); a
machine's N GPUs become N=2 logical CPU devices (`--num_cpu_devices`), and
the many-machine commands run as two local workers with localhost ports in
TF_CONFIG. XLA compiles a training step for minutes on a CPU, so only the
1-GPU commands keep their `--jit_compile`; the others add `false`.
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.test_train import _env
from tests.test_train import _free_ports
from tests.test_train import _load
from tests.test_train import _steps
from tests.test_train import run_local_workers
from tests.test_train import write_tiny_records

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- gpu-recipe:[^>]*-->\s*```bash\n(.*?)```", re.DOTALL)
ESTIMATE = re.compile(r"<!-- gpu-estimate:[^>]*-->\n(.*?)<!-- /gpu-estimate -->", re.DOTALL)
GPUS_PER_MACHINE = 4  # The recipe's "2 x 4 GPUs here".
CPU_CUTS = (
    "--image_size=64",
    "--batch_size=4",
    "--epochs=1",
    "--steps_per_epoch=2",
    "--validation_steps=1",
    "--num_overlay_images=0",
    "--backup_every_steps=2",
    "--verbose=2",
)


def recipe_commands(text=None):
    """The recipe's commands: list of (env dict, argv list after `python`)."""
    text = README.read_text() if text is None else text
    match = BLOCK.search(text)
    assert match, "README.md has no gpu-recipe block"
    commands, pending = [], ""
    for line in match.group(1).splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        words = shlex.split(pending)
        pending = ""
        env = {}
        while "=" in words[0] and not words[0].startswith("-"):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        assert words[:3] == ["python", "-m", "cxr_tf.train"], words
        commands.append((env, words[1:]))
    return commands


def _topology(env):
    if "TF_CONFIG" in env:
        return "machines"
    return "gpus" if "CUDA_VISIBLE_DEVICES" in env else "gpu"


def _cpu_argv(argv, data, model_dir, jit):
    kept = [a for a in argv if not a.startswith(("--data_dir=", "--model_dir="))]
    extra = [] if jit else ["--jit_compile=false"]
    return kept + [f"--data_dir={data}", f"--model_dir={model_dir}", *CPU_CUTS, *extra]


_RESOLVE = """
import json, sys
from cxr_tf import train
out = []
for argv in json.loads(sys.argv[1]):
    out.append(train.config_from_argv(argv[2:], paths=False).to_dict())
print(json.dumps(out))
"""


def test_recipe_has_every_topology_for_both_papers():
    commands = recipe_commands()
    seen = {
        (_topology(env), next(a for a in argv if a.startswith("--flagfile=")))
        for env, argv in commands
    }
    flagfiles = {"--flagfile=configs/pcam_resnet34.flags", "--flagfile=configs/infomask.flags"}
    assert seen == {(t, f) for t in ("gpu", "gpus", "machines") for f in flagfiles}
    assert f"(2 x {GPUS_PER_MACHINE} GPUs here)" in README.read_text()


def test_recipe_commands_resolve_with_the_gpu_flags():
    commands = recipe_commands()
    run = subprocess.run(
        [sys.executable, "-c", _RESOLVE, json.dumps([argv for _, argv in commands])],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    configs = json.loads(run.stdout.strip().splitlines()[-1])
    for (env, argv), config in zip(commands, configs):
        assert config["mixed_precision"] == "mixed_bfloat16", argv
        # XLA everywhere but InfoMask, whose compiled bf16 step fails.
        backbone = config["model"]["backbone"]
        xla = "false" if backbone == "infomask" else "true"
        assert config["jit_compile"] == xla, argv
        topology = _topology(env)
        if topology == "machines":
            tf_config = json.loads(env["TF_CONFIG"])
            assert config["strategy"] == "multi_worker"
            replicas = len(tf_config["cluster"]["worker"]) * GPUS_PER_MACHINE
        else:
            assert config["strategy"] == "mirrored"
            replicas = len(env.get("CUDA_VISIBLE_DEVICES", "0").split(","))
        # The global batch splits evenly over the replicas.
        assert config["batch_size"] % replicas == 0, (argv, replicas)
        if topology != "machines":
            paper = {"resnet34": 36, "infomask": 32}
            assert config["batch_size"] == paper[backbone], argv


def test_readme_estimate_table_is_the_scripts():
    spec = importlib.util.spec_from_file_location(
        "gpu_estimate", ROOT / "benchmarks" / "gpu_estimate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.estimate()
    rows = ESTIMATE.search(README.read_text()).group(1).strip().splitlines()[2:]
    assert rows == module.markdown_rows(result)
    stored = json.loads((ROOT / "docs" / "benchmarks" / "gpu_estimate.json").read_text())
    assert stored == json.loads(json.dumps(result))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    data = tmp_path_factory.mktemp("records")
    write_tiny_records(str(data))
    return str(data)


def _run(argv, env=None):
    return subprocess.run(
        [sys.executable, *argv], env=_env(**(env or {})), capture_output=True,
        text=True, timeout=1200,
    )


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_one_gpu_commands_train_on_cpu(tiny_records, tmp_path, index):
    commands = [c for c in recipe_commands() if _topology(c[0]) == "gpu"]
    _, argv = commands[index]
    model_dir = tmp_path / "model"
    run = _run(_cpu_argv(argv, tiny_records, model_dir, jit=True))
    assert run.returncode == 0, run.stderr[-3000:]
    assert _steps(str(model_dir)) == 2
    _load(str(model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_n_gpu_commands_train_on_logical_cpus(tiny_records, tmp_path, index):
    commands = [c for c in recipe_commands() if _topology(c[0]) == "gpus"]
    env, argv = commands[index]
    model_dir = tmp_path / "model"
    cpu = _cpu_argv(argv, tiny_records, model_dir, jit=False) + ["--num_cpu_devices=2"]
    run = _run(cpu, {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 replica(s)" in run.stderr
    assert _steps(str(model_dir)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_many_machine_commands_train_as_local_workers(tiny_records, tmp_path, index):
    commands = [c for c in recipe_commands() if _topology(c[0]) == "machines"]
    env, argv = commands[index]
    tf_config = json.loads(env["TF_CONFIG"])
    workers = [f"localhost:{p}" for p in _free_ports(len(tf_config["cluster"]["worker"]))]
    model_dir = tmp_path / "model"
    cpu = _cpu_argv(argv, tiny_records, model_dir, jit=False)
    outputs = run_local_workers([sys.executable, *cpu], workers, timeout=1200)
    assert f"{len(workers)} replica(s)" in outputs[0][1]
    assert _steps(str(model_dir)) == 2
    assert os.path.isfile(model_dir / "model.keras")
