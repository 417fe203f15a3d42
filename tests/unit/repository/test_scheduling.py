"""Triton's scheduling knobs as config keys: what lands in each ModelConfig, and what is refused first."""

from collections import Counter
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe.contract import instance_index
from tritonpipe.deploy.layout import build_manifests
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.files import compose_config, parse_overrides
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository import configs as configs_module
from tritonpipe.repository.configs import RATE_LIMIT_FLAG, RESPONSE_CACHE_FLAG, server_flags
from tritonpipe.repository.generate import build_repository, generate_repository
from tritonpipe.server.owner import TritonServer

MAT = {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}
TENSOR = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8}


def configs(config, device="auto"):
    return build_repository(load_graph(config), device=device)[1]


def only(config, device="auto") -> mc.ModelConfig:
    (model,) = configs(config, device).values()
    return model


def test_queue_policy_priorities_and_preferred_sizes_reach_dynamic_batching():
    batching = only({**MAT, "max": 8, "batching_timeout": 2, "preferred_batch_size": "8,4", "max_queue_size": 16,
                     "queue_timeout": 1.5, "timeout_action": "delay", "allow_timeout_override": True,
                     "priority_levels": 3, "default_priority_level": 2}).dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 2000
    assert (batching.priority_levels, batching.default_priority_level) == (3, 2)
    policy = batching.default_queue_policy
    assert policy.max_queue_size == 16 and policy.default_timeout_microseconds == 1500
    assert policy.timeout_action == mc.ModelQueuePolicy.DELAY and policy.allow_timeout_override


def test_defaults_leave_triton_defaults():
    config = only({**MAT, "max": 4})
    assert not config.dynamic_batching.HasField("default_queue_policy")
    assert not config.dynamic_batching.preferred_batch_size and not config.dynamic_batching.priority_levels
    assert not config.HasField("response_cache")


def test_a_queue_setting_turns_on_the_dynamic_batcher_even_without_batching():
    # the default scheduler has no queue: max_queue_size only works inside the dynamic batcher
    config = only({**MAT, "max_queue_size": 2})
    assert config.max_batch_size == 1 and config.HasField("dynamic_batching")
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 2
    assert config.dynamic_batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert not only(MAT).HasField("dynamic_batching")


def test_default_priority_is_the_lowest_level_when_unset():
    batching = only({**MAT, "priority_levels": 4}).dynamic_batching
    assert (batching.priority_levels, batching.default_priority_level) == (4, 4)


def test_set_on_the_command_line_takes_triton_keys():
    config, base = compose_config(None, "S[DecodeMat,ResizeMat]", parse_overrides(
        ["resize_h=8", "resize_w=8", "max=8", "preferred_batch_size=4", "response_cache=true"]))
    model = only(config)
    assert list(model.dynamic_batching.preferred_batch_size) == [4] and model.response_cache.enable


@pytest.mark.parametrize("extra, message", [
    ({"max": 4, "preferred_batch_size": "8"}, "preferred_batch_size 8 exceeds max=4"),
    ({"preferred_batch_size": "0"}, "preferred_batch_size must be batch sizes like 4 or 4,8, got '0'"),
    ({"preferred_batch_size": "4x"}, "preferred_batch_size must be batch sizes"),
    ({"max_queue_size": -1}, "max_queue_size"),
    ({"timeout_action": "drop"}, "timeout_action"),
    ({"priority_levels": 2, "default_priority_level": 3}, "default_priority_level must be in [1, priority_levels=2], got 3"),
    ({"default_priority_level": 1}, "default_priority_level must be in [1, priority_levels=0]"),
    ({"instances_per_gpu": "0:2,0:1"}, "instances_per_gpu must be distinct GPU:count pairs"),
    ({"instances_per_gpu": "0"}, "instances_per_gpu must be distinct GPU:count pairs"),
    ({"instances_per_gpu": "1:0"}, "count 1-1024"),
])
def test_bad_scheduling_keys_are_refused_before_anything_is_written(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate_repository(load_graph({**MAT, **extra}), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_instances_per_gpu_gives_one_group_per_gpu():
    groups = only({**TENSOR, "instances_per_gpu": "0:2,1:1", "instance_affinity": False}, device="gpu").instance_group
    assert [(g.count, list(g.gpus), g.kind) for g in groups] == [
        (2, [0], mc.ModelInstanceGroup.KIND_GPU), (1, [1], mc.ModelInstanceGroup.KIND_GPU)]


def test_instance_num_is_per_listed_gpu_and_cpu_models_ignore_instances_per_gpu():
    (group,) = only({**TENSOR, "instance_num": 2, "device_id": "0,1", "instance_affinity": "false"}, device="gpu").instance_group
    assert (group.count, list(group.gpus)) == (2, [0, 1])  # Triton starts 2 on each: 4 instances
    (group,) = only({**MAT, "instance_num": 3, "instances_per_gpu": "0:2"}).instance_group
    assert (group.count, group.kind, list(group.gpus)) == (3, mc.ModelInstanceGroup.KIND_CPU, [])


def test_ensemble_caches_once_when_every_step_asks(tiny_onnx):
    chain = {"backend": "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]", "resize_h": 32, "resize_w": 32,
             "model": str(tiny_onnx), "max": 4, "response_cache": True, "max_queue_size": 8}
    built = configs(chain, device="cpu")
    ensemble = next(c for c in built.values() if c.platform == "ensemble")
    steps = [c for c in built.values() if c.platform != "ensemble"]
    assert ensemble.response_cache.enable and not ensemble.HasField("dynamic_batching")
    assert len(steps) == 2 and not any(c.response_cache.enable for c in steps)
    assert all(c.dynamic_batching.default_queue_policy.max_queue_size == 8 for c in steps)


def test_a_graph_caches_only_the_nodes_that_ask():
    built = configs({"decode": {"backend": "DecodeMat", "next": "resize", "response_cache": True},
                     "resize": {"backend": "ResizeMat", "resize_h": 8, "resize_w": 8}}, device="cpu")
    assert {name: c.response_cache.enable for name, c in built.items()} == {
        "decode": True, "resize": False, "pipeline": False}


def test_global_keys_reach_every_node():
    built = configs({"global": {"max_queue_size": 5, "max": 2},
                     "decode": {"backend": "DecodeMat", "next": "resize"},
                     "resize": {"backend": "ResizeMat", "resize_h": 8, "resize_w": 8}}, device="cpu")
    queues = {name: c.dynamic_batching.default_queue_policy.max_queue_size for name, c in built.items()}
    assert queues == {"decode": 5, "resize": 5, "pipeline": 0}


def test_written_config_parses_with_tritons_schema(tmp_path):
    repo = generate_repository(load_graph({**MAT, "max": 4, "max_queue_size": 3, "response_cache": True}), tmp_path / "r")
    text = (repo.path / "pipeline" / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 3 and config.response_cache.enable


def _server(tmp_path: Path, repo: Path, **kwargs) -> TritonServer:
    return TritonServer(repo, log_file=tmp_path / "log", **kwargs)  # command() starts nothing


def test_the_server_turns_its_cache_on_only_when_a_model_asks(tmp_path):
    cached = generate_repository(load_graph({**MAT, "response_cache": True}), tmp_path / "cached").path
    plain = generate_repository(load_graph(MAT), tmp_path / "plain").path
    assert RESPONSE_CACHE_FLAG in _server(tmp_path, cached).command()
    assert not any(flag.startswith("--cache-config") for flag in _server(tmp_path, plain).command())
    own = "--cache-config=local,size=1024"
    command = _server(tmp_path, cached, extra_args=(own,)).command()
    assert own in command and RESPONSE_CACHE_FLAG not in command


def test_model_control_explicit_leaves_the_api_open_and_healing_off(tmp_path):
    repo = generate_repository(load_graph(MAT), tmp_path / "r").path
    owned = _server(tmp_path, repo).command()
    assert "--model-control-mode=explicit" in owned and any(f.startswith("--grpc-restricted-protocol") for f in owned)
    server = _server(tmp_path, repo, model_control="explicit")
    opened = server.command()
    assert "--model-control-mode=explicit" in opened and "--load-model=*" in opened
    assert not any("restricted" in flag for flag in opened) and server.heal_policy is None
    with pytest.raises(ConfigError, match="model_control must be one of owner, explicit, got 'none'"):
        _server(tmp_path, repo, model_control="none")


def _per_gpu(config: mc.ModelConfig) -> Counter:
    """Instances by GPU (-1: each GPU, where a group lists none)."""
    counts: Counter = Counter()
    for group in config.instance_group:
        for gpu in list(group.gpus) or [-1]:
            counts[gpu] += group.count
    return counts


def _groups(config: mc.ModelConfig) -> list[tuple[int, list[int], int]]:
    return [(g.count, list(g.gpus), g.rate_limiter.priority) for g in config.instance_group]


@pytest.mark.parametrize("keys, want", [
    ({"instance_num": 4}, [(1, [], 1), (3, [], 1000)]),
    ({"instance_num": 2, "device_id": "0,1"}, [(1, [0], 1), (1, [0], 1000), (2, [1], 1000)]),
    ({"instances_per_gpu": "1:2,0:1"}, [(1, [1], 1), (1, [1], 1000), (1, [0], 1000)]),
    ({"instance_num": 1}, [(1, [], 0)]),
])
def test_instance_affinity_puts_one_instance_first_and_keeps_the_count(keys, want):
    plain = only({**TENSOR, **keys}, device="gpu")
    config = only({**TENSOR, **keys, "instance_affinity": True}, device="gpu")
    assert _groups(config) == want
    assert _per_gpu(config) == _per_gpu(plain)  # the same instances on the same GPUs
    assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)


def test_instance_affinity_by_default_is_on_for_gpu_instances_only(monkeypatch):
    on_gpu = [(1, [], 1), (2, [], 1000)]
    assert _groups(only({**TENSOR, "instance_num": 3}, device="gpu")) == on_gpu
    assert _groups(only({**TENSOR, "instance_num": 3}, device="cpu")) == [(3, [], 0)]
    assert _groups(only({**MAT, "instance_num": 3}, device="gpu")) == [(3, [], 0)]  # a CPU model
    # device auto leaves the kind to Triton: on where this host has a GPU
    monkeypatch.setattr(configs_module, "_gpu_visible", lambda: False)
    assert _groups(only({**TENSOR, "instance_num": 3})) == [(3, [], 0)]
    monkeypatch.setattr(configs_module, "_gpu_visible", lambda: True)
    assert _groups(only({**TENSOR, "instance_num": 3})) == on_gpu
    assert _groups(only({**TENSOR, "instance_num": 3, "instance_affinity": "false"})) == [(3, [], 0)]
    for no in (False, "0", "off", "No"):
        assert _groups(only({**TENSOR, "instance_num": 3, "instance_affinity": no})) == [(3, [], 0)]
    for yes in (True, "1", "yes", "ON"):
        assert _groups(only({**TENSOR, "instance_num": 3, "instance_affinity": yes}, device="cpu")) == on_gpu
    with pytest.raises(ConfigError, match="instance_affinity.*auto, true, false"):
        only({**TENSOR, "instance_affinity": "sometimes"})


def test_instance_affinity_on_a_cpu_model_and_the_flag_the_server_needs(tmp_path):
    config = only({**MAT, "instance_num": 3, "instance_affinity": True}, device="cpu")
    assert _groups(config) == [(1, [], 1), (2, [], 1000)]
    assert server_flags([config]) == [RATE_LIMIT_FLAG]
    assert server_flags([only({**MAT, "instance_num": 3}, device="cpu")]) == []
    repo = generate_repository(load_graph({**MAT, "instance_num": 3, "instance_affinity": True}), tmp_path / "r").path
    assert RATE_LIMIT_FLAG in _server(tmp_path, repo).command()
    own = _server(tmp_path, repo, extra_args=("--rate-limit=off",)).command()
    assert "--rate-limit=off" in own and RATE_LIMIT_FLAG not in own
    manifests = build_manifests(configs({**MAT, "instance_num": 3, "instance_affinity": True}), repo, "pipeline")
    args = yaml.safe_load(manifests.by_path()["base/deployment.yaml"].text())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert RATE_LIMIT_FLAG in args


@pytest.mark.parametrize("name, index", [("m_0_0", 0), ("m_1_0", 1), ("m_1_2", 3), ("other_5", 5), ("odd", None)])
def test_an_instance_index_counts_the_groups_before_it(name, index):
    config = {"instance_group": [{"name": "m_0", "count": 1}, {"name": "m_1", "count": 3}]}
    assert instance_index(config, name) == index
