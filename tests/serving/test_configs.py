"""serving/*.config parse as the protos TF Serving reads them into."""

import os

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

SERVING = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "serving",
)


def _read(name):
    with open(os.path.join(SERVING, name)) as f:
        return f.read()


def test_models_config():
    config = text_format.Parse(
        _read("models.config"), model_server_config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert model.name == "cxr"
    assert os.path.isabs(model.base_path)
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.latest.num_versions == 1


def _messages():
    """BatchingParameters and MonitoringConfig, with the fields of TF Serving's
    session_bundle_config.proto and monitoring_config.proto (the pip package
    of tensorflow-serving-api does not ship them)."""
    f = descriptor_pb2.FileDescriptorProto(
        name="cxr_test_serving_configs.proto",
        package="cxr_test",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    label = descriptor_pb2.FieldDescriptorProto

    def add(message, name, number, type_, type_name=None, repeated=False):
        field = message.field.add(name=name, number=number, type=type_)
        field.label = label.LABEL_REPEATED if repeated else label.LABEL_OPTIONAL
        if type_name:
            field.type_name = type_name

    batching = f.message_type.add(name="BatchingParameters")
    for number, name in (
        (1, "max_batch_size"),
        (2, "batch_timeout_micros"),
        (4, "num_batch_threads"),
        (5, "max_enqueued_batches"),
    ):
        add(
            batching,
            name,
            number,
            label.TYPE_MESSAGE,
            ".google.protobuf.Int64Value",
        )
    add(
        batching,
        "thread_pool_name",
        3,
        label.TYPE_MESSAGE,
        ".google.protobuf.StringValue",
    )
    add(batching, "allowed_batch_sizes", 6, label.TYPE_INT64, repeated=True)
    add(batching, "pad_variable_length_inputs", 7, label.TYPE_BOOL)
    prometheus = f.message_type.add(name="PrometheusConfig")
    add(prometheus, "enable", 1, label.TYPE_BOOL)
    add(prometheus, "path", 2, label.TYPE_STRING)
    monitoring = f.message_type.add(name="MonitoringConfig")
    add(
        monitoring,
        "prometheus_config",
        1,
        label.TYPE_MESSAGE,
        ".cxr_test.PrometheusConfig",
    )
    pool = descriptor_pool.DescriptorPool()
    from google.protobuf import wrappers_pb2

    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(f)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("cxr_test.BatchingParameters")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("cxr_test.MonitoringConfig")
        ),
    )


def test_batching_config():
    batching_cls, _ = _messages()
    params = text_format.Parse(_read("batching.config"), batching_cls())
    sizes = list(params.allowed_batch_sizes)
    # TF Serving requires increasing sizes ending at max_batch_size.
    assert sizes == sorted(sizes) and sizes[-1] == params.max_batch_size.value
    assert 0 < params.batch_timeout_micros.value <= 100_000
    assert params.num_batch_threads.value >= 1


def test_monitoring_config():
    _, monitoring_cls = _messages()
    config = text_format.Parse(_read("monitoring.config"), monitoring_cls())
    assert config.prometheus_config.enable
    assert config.prometheus_config.path.startswith("/")


def test_a_misspelt_field_would_fail():
    batching_cls, _ = _messages()
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_sizes { value: 1 }", batching_cls())
