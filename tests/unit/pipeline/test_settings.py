"""Node settings: one declaration per key gives its coercion, default, routing and reference row."""

import dataclasses
import json

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline import graph as graph_module
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.pipeline.resolved import Role
from tritonpipe.pipeline.settings import TRITON_KEYS, NodeSettings, node_settings

MAT = {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}


def test_every_field_is_a_key_and_every_key_a_field_or_alias():
    names = {f.name for f in dataclasses.fields(NodeSettings)}
    keyed = {f.metadata["setting"].key or f.name for f in dataclasses.fields(NodeSettings)}
    assert len(keyed) == len(names) and set(TRITON_KEYS) == keyed | {"worker_num"}


def test_defaults_are_the_params_defaults_parsed():
    settings = NodeSettings()
    assert (settings.warmup, settings.execution_timeout, settings.gpus, settings.gpu_instances) == ((1080, 1920), 60.0, (), ())
    assert TRITON_KEYS["warmup"].default == "1080x1920" and TRITON_KEYS["execution_timeout"].default == 60.0
    assert node_settings("node 'x'", {}) == settings == load_graph(MAT).entry.settings


def test_written_values_become_fields():
    settings = node_settings("node 'x'", {"device_id": "0,1", "warmup": "off", "worker_num": "3", "max": "4x3x8x8",
                                          "instances_per_gpu": "0:2", "preferred_batch_size": "2,2,1"})
    assert (settings.gpus, settings.warmup, settings.instance_num, settings.max) == ((0, 1), None, 3, 4)
    assert (settings.gpu_instances, settings.preferred_batch_sizes) == (((0, 2),), (1, 2))


def test_an_alias_is_coerced_under_its_own_name():
    with pytest.raises(ConfigError, match=r"node 'x': parameter 'worker_num' must be in \[1, 1024\]"):
        node_settings("node 'x'", {"worker_num": 0})


def test_a_new_field_is_a_new_key():
    @dataclasses.dataclass
    class More(NodeSettings):
        pass

    assert all("setting" in f.metadata for f in dataclasses.fields(More))


def test_roles_are_their_strings():
    assert Role.MODEL == "model" and "sequence" in (Role.WRAPPER, Role.SEQUENCE)
    assert f"{Role.WRAPPER}" == str(Role.WRAPPER) == "wrapper" and json.dumps(Role.PROCESS) == '"process"'
    assert load_graph(MAT).entry.tree.role == Role.SEQUENCE


def test_the_graph_lists_each_nodes_predecessors():
    config = {
        "a": {"backend": "S[DecodeMat,ResizeMat(resize_h=8,resize_w=8)]", "next": "b,c"},
        "b": {"backend": "S[Mat2Tensor]", "next": "d"}, "c": {"backend": "S[Mat2Tensor]", "next": "d"},
        "d": {"backend": "S[Tensor2Mat]", "map": "b[result:data]"},
    }
    assert load_graph(config).predecessors() == {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def test_list_entries_and_graph_nodes_share_the_name_rule():
    from tritonpipe.pipeline import names, objects

    assert objects.check_name is names.check_name is graph_module.check_name
