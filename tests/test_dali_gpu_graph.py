"""The GPU (``mixed``) DALI graphs, defined without a GPU.

DALI checks operator devices and argument inputs when a pipeline's graph is defined; only ``build()``
needs the device. Defining every graph the loaders would build on a GPU catches, on this machine,
the class of mistake that once made every GPU training run fail before its first step: a named
argument fed from GPU data.
"""
import pytest
from nvidia.dali import fn, pipeline_def, types

from lcr_fast.data import build_eval_loader, build_train_loader

from helpers import write_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("gpu_graph"), classes=2, per_class=2)


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_training_graph_defines_for_the_gpu(data, recipe):
    loader = build_train_loader(data, recipe, 2, 224, "dali", "cuda:0", 2, seed=0)
    pipe = loader._runner.define(device_id=None)
    assert pipe is not None


def test_evaluation_graph_defines_for_the_gpu(data):
    loader = build_eval_loader(data, "test", 2, 224, "dali", "cuda:0", 2)
    assert loader._runner.define(device_id=None) is not None


def test_definition_rejects_a_named_argument_from_gpu_data():
    """The check the tests above rely on: DALI refuses, at definition, a GPU node as a named argument."""

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        images = fn.external_source(source=lambda: None, batch=True, layout="HWC").gpu()
        offset = fn.reductions.mean(images, axis_names="HW")
        return fn.coord_transform(images, T=offset, dtype=types.UINT8)

    with pytest.raises(ValueError, match="Named arguments must be on CPU"):
        graph()
