"""The list form: [(name, stage, config), ...] of strings, functions and torch modules -> a graph."""

import functools
import math
from pathlib import Path

import pytest
import torch

from tritonpipe import load_graph
from tritonpipe.errors import ConfigError
from tritonpipe.repository.generate import build_repository
from tritonpipe.stages.function import load_function

HERE = Path(__file__).resolve()


def top_level_function(data):
    return torch.tensor([len(data)], dtype=torch.float32)


class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(1, 3)

    def forward(self, x):
        return self.linear(x) * 2


def test_each_entry_is_a_node_linked_to_the_next():
    graph = load_graph(
        [
            ("decode", "S[DecodeMat,ResizeMat,Mat2Tensor]", {"resize_h": 8, "resize_w": 8, "worker_num": 2}),
            ("same", "Identity", {}),
            ("last", "Identity"),
        ],
        name="chain",
    )
    assert graph.name == "chain" and list(graph.nodes) == ["decode", "same", "last"]
    assert [n.next for n in graph.nodes.values()] == [["same"], ["last"], []]
    assert graph.nodes["decode"].settings.instance_num == 2


def test_a_function_is_served_from_its_file_by_name():
    graph = load_graph([("count", top_level_function, {"worker_num": 2})])
    stage = graph.entry.tree
    assert (stage.name, stage.params["function"], stage.params["input"]) == ("Function", "top_level_function", "bytes")
    assert Path(stage.params["function_file"]) == HERE
    _, configs, files = build_repository(graph, device="cpu")
    assert files["pipeline"] == {HERE.name: HERE}  # copied beside the model, as plugin files are
    assert list(configs["pipeline"].output[0].dims) == [1]


def test_a_module_is_exported_and_runs_as_the_module_does():
    module = Doubler()
    graph = load_graph([("double", module, {"inputs": "x:FP32:1", "max": 4})])
    stage = graph.entry.tree.find("model")
    path = Path(stage.params["model"])
    assert path.suffix == ".pt2" and path.is_file() and stage.params["engine"] == "torch"
    exported = torch.export.load(str(path)).module()
    rows = torch.randn(5, 1)  # a batch size the export never saw
    torch.testing.assert_close(exported(rows), module(rows))
    assert module.training  # put back as it was given
    _, configs, _ = build_repository(graph, device="cpu")
    assert [list(t.dims) for t in configs["pipeline"].output] == [[3]]


def test_entries_after_the_first_are_fed_tensors():
    graph = load_graph([("count", top_level_function), ("double", Doubler(), {"inputs": "x:FP32:1"})])
    assert graph.nodes["count"].tree.params["input"] == "bytes"
    again = load_graph([("double", Doubler(), {"inputs": "x:FP32:1"}), ("count", top_level_function)])
    assert again.nodes["count"].tree.params["input"] == "tensor"


def test_the_export_folder_lives_as_long_as_the_graph():
    graph = load_graph([("double", Doubler(), {"inputs": "x:FP32:1"})])
    path = Path(graph.entry.tree.find("model").params["model"])
    assert path.is_file()
    del graph
    assert not path.exists()


def closure_maker():
    scale = 3

    def scaled(data):
        return torch.tensor([len(data) * scale])

    return scaled


class Callable:
    def __call__(self, data):
        return data


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (lambda data: data, r"a lambda cannot be served.*define it with def at the top level"),
        (closure_maker(), r"closure_maker.<locals>.scaled is defined inside another function \(a closure\)"),
        (math.sqrt, r"is not a pipeline string, a function or a torch.nn.Module"),
        (Callable(), r"is not a pipeline string, a function or a torch.nn.Module"),
        (functools.partial(top_level_function), r"is not a pipeline string, a function or a torch.nn.Module"),
    ],
)
def test_what_the_server_cannot_import_by_name_is_refused(stage, message):
    with pytest.raises(ConfigError, match=message):
        load_graph([("bad", stage, {})])


def test_a_function_defined_in_no_file_is_refused():
    namespace: dict = {}
    exec("def made(data):\n    return data\n", namespace)  # noqa: S102 - a function without a source file
    with pytest.raises(ConfigError, match=r"made is defined in no file"):
        load_graph([("bad", namespace["made"], {})])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], r"at least one \(name, stage, config\) entry"),
        ([("a",)], r"entry 0 of the pipeline list must be \(name, stage, config\)"),
        ([("a", "Identity"), ("a", "Identity")], r"entry 'a' appears twice"),
        ([("../a", "Identity")], r"entry name '../a' is not allowed"),
        ([("a", "Identity", {"next": "b"})], r"the list sets next itself"),
        ([("a", "Identity", [1])], r"its config must be a dict"),
        ([("m", Doubler(), {})], r"a torch.nn.Module is exported from an example input.*inputs = "),
        ([("m", Doubler(), {"inputs": "x:FP32:-1"})], r"inputs x have free dims"),
        ([("m", Doubler(), {"inputs": "x:FP32:4"})], r"torch.export cannot export the module from inputs 'x:FP32:4'"),
    ],
)
def test_malformed_lists_are_refused_with_the_entry_named(entries, message):
    with pytest.raises(ConfigError, match=message):
        load_graph(entries)


def test_load_function_finds_what_the_server_will_import():
    assert load_function(HERE, "top_level_function")(b"abc").tolist() == [3.0]
