"""worker_num and cores_per_worker: the keys, the generator's share of the host, and its refusal."""

import json
from pathlib import Path

import pytest
import torch

from tritonpipe import load_graph
from tritonpipe.contract import PARAM_CORES, CpuCores, ModelParams
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.settings import NodeSettings
from tritonpipe.repository.cores import Workers, host_cores, share_cores
from tritonpipe.repository.generate import build_repository, generate_repository
from tritonpipe.stages.function import Function

HOST16 = list(range(16))
MAT = "S[DecodeMat,ResizeMat]"
SIZE = {"resize_h": 8, "resize_w": 8}


def workers(name: str, count: int, cores: int = 0, *, gpu: bool = False, **keys) -> Workers:
    return Workers(name, NodeSettings(instance_num=count, cores_per_worker=cores, **keys), gpu)


def cores_of(configs, model: str) -> CpuCores | None:
    params = configs[model].parameters
    return CpuCores.decode(params[PARAM_CORES].string_value) if PARAM_CORES in params else None


def test_worker_num_is_instance_num():
    graph = load_graph({"backend": MAT, **SIZE, "worker_num": 3})
    assert graph.entry.settings.instance_num == 3
    agreeing = load_graph({"backend": MAT, **SIZE, "worker_num": 2, "instance_num": "2"})
    assert agreeing.entry.settings.instance_num == 2


def test_worker_num_and_instance_num_that_disagree_are_refused():
    with pytest.raises(ConfigError, match=r"worker_num = 3 and instance_num = 2 disagree"):
        load_graph({"backend": MAT, **SIZE, "worker_num": 3, "instance_num": 2})


def test_cores_keys_are_range_checked():
    with pytest.raises(ConfigError, match=r"cores_per_worker.*\[0, 4096\], got -1"):
        load_graph({"backend": MAT, **SIZE, "cores_per_worker": -1})
    settings = load_graph({"backend": MAT, **SIZE, "cores_per_worker": 2, "pin_cores": "false"}).entry.settings
    assert (settings.cores_per_worker, settings.pin_cores, settings.oversubscribe) == (2, False, False)


def test_sets_are_disjoint_across_every_cpu_instance_of_the_repository():
    shares = share_cores([workers("pre", 4, 2), workers("model", 3, 2)], "cpu", HOST16)
    sets = [*shares["pre"].sets, *shares["model"].sets]
    assert len(sets) == 7 and all(len(s) == 2 for s in sets)
    assert len({core for s in sets for core in s}) == 14  # no core twice
    assert shares["pre"].threads == shares["model"].threads == 2


def test_without_the_key_the_cores_left_are_shared_by_all_cpu_instances_not_per_model():
    shares = share_cores([workers("a", 2), workers("b", 2), workers("pinned", 2, 4)], "cpu", HOST16)
    # 8 cores pinned; the 8 left go to the 4 instances of a and b together
    assert shares["a"] == shares["b"] == CpuCores(2)
    alone = share_cores([workers("a", 2), workers("b", 2)], "cpu", HOST16)
    assert alone["a"].threads == 4  # 16 cores over 4 instances, not 8 each as a per-model split would give


def test_models_that_may_run_on_a_gpu_get_cores_only_when_their_node_asks():
    shares = share_cores([workers("pre", 2), workers("net", 2, gpu=True)], "auto", HOST16)
    assert "net" not in shares and shares["pre"].threads == 8
    asked = share_cores([workers("net", 2, 3, gpu=True)], "auto", HOST16)
    assert [len(s) for s in asked["net"].sets] == [3, 3]
    assert share_cores([workers("net", 2, 3, gpu=True)], "gpu", HOST16) == {}


def test_asking_for_more_cores_than_the_host_has_is_refused():
    with pytest.raises(ConfigError, match=r"ask for 32 cores \(pre: 4 x 4, model: 4 x 4\) but this host has 16"):
        share_cores([workers("pre", 4, 4), workers("model", 4, 4)], "cpu", HOST16)


def test_oversubscribe_lets_workers_share_cores():
    shares = share_cores([workers("pre", 4, 4, oversubscribe=True), workers("m", 4, 4, oversubscribe=True)], "cpu", HOST16)
    sets = [*shares["pre"].sets, *shares["m"].sets]
    assert all(len(s) == 4 for s in sets) and sorted(c for s in sets for c in s) == sorted(HOST16 * 2)


def test_pin_cores_false_keeps_the_threads_and_drops_the_sets():
    shares = share_cores([workers("pre", 2, 3, pin_cores=False)], "cpu", HOST16)
    assert shares["pre"] == CpuCores(3)


def test_the_repository_carries_each_models_sets(tmp_path):
    host = host_cores()
    graph = load_graph({"backend": MAT, **SIZE, "worker_num": len(host), "cores_per_worker": 1})
    _, configs, _ = build_repository(graph, device="cpu")
    share = cores_of(configs, "pipeline")
    assert share.threads == 1 and sorted(c for s in share.sets for c in s) == host
    decoded = ModelParams.decode({k: v.string_value for k, v in configs["pipeline"].parameters.items()})
    assert decoded.cores == share


def test_oversubscription_is_refused_before_anything_is_written(tmp_path):
    host = host_cores()
    graph = load_graph(
        {"a": {"backend": MAT, **SIZE, "next": "b"}, "b": {"backend": "Identity"}, "worker_num": len(host), "cores_per_worker": 1}
    )
    target = tmp_path / "repo"
    with pytest.raises(ConfigError, match=rf"ask for {2 * len(host)} cores .* this host has {len(host)}") as caught:
        generate_repository(graph, target, device="cpu")
    assert "\n" not in str(caught.value)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    graph = load_graph(
        {"a": {"backend": MAT, **SIZE, "next": "b"}, "b": {"backend": "Identity"}, "worker_num": len(host),
         "cores_per_worker": 1, "oversubscribe": True}
    )
    generate_repository(graph, target, device="cpu")
    assert (target / "a" / "config.pbtxt").is_file()


def test_cpu_cores_parameter_round_trips_and_rejects_garbage():
    share = CpuCores(2, ((0, 1), (2, 3)))
    assert CpuCores.decode(share.encode()) == share
    assert json.loads(share.encode()) == {"threads": 2, "sets": [[0, 1], [2, 3]]}
    with pytest.raises(ConfigError, match="tritonpipe.cores"):
        CpuCores.decode('{"threads": 0, "sets": []}')
    with pytest.raises(ConfigError, match="tritonpipe.cores"):
        CpuCores.decode("four")


# --- the Function stage -------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fns.py"
    path.write_text(text)
    return path


def test_function_output_is_found_by_calling_it_once(tmp_path):
    path = write(tmp_path, "import torch\ndef size(data):\n    return torch.tensor([len(data), 7], dtype=torch.int32)\n")
    params = {"function_file": str(path), "function": "size", "input": "bytes", "output": ""}
    spec = Function.infer(params, Function.entry_spec(params))
    assert (spec.dtype, spec.triton_dims) == ("INT32", (2,))
    declared = Function.infer({**params, "output": "FP32:3x-1"}, Function.entry_spec(params))
    assert (declared.dtype, declared.triton_dims) == ("FP32", (3, -1))


def test_function_input_modes_are_checked_against_what_they_are_fed(tmp_path):
    path = write(tmp_path, "def same(x):\n    return x\n")
    params = {"function_file": str(path), "function": "same", "input": "bytes", "output": ""}
    rows = Function.entry_spec({**params, "input": "FP32:3x4"})
    with pytest.raises(ConfigError, match="takes bytes .* set input = tensor"):
        Function.infer(params, rows)
    assert Function.infer({**params, "input": "tensor"}, rows).triton_dims == (3, 4)
    with pytest.raises(ConfigError, match=r"input = \"FP32:3x224x224\""):
        Function.entry_spec({**params, "input": "tensor"})


def test_function_that_fails_on_the_sample_or_is_missing_says_what_to_do(tmp_path):
    path = write(tmp_path, "def broken(data):\n    raise KeyError('nope')\nvalue = 3\n")
    params = {"function_file": str(path), "function": "broken", "input": "bytes", "output": ""}
    with pytest.raises(ConfigError, match=r"raised on a sample JPEG.*KeyError.*output = \"FP32:3x224x224\""):
        Function.infer(params, Function.entry_spec(params))
    with pytest.raises(ConfigError, match=r"defines no function 'value' at its top level \(found int\)"):
        Function.infer({**params, "function": "value"}, Function.entry_spec(params))


def test_function_runs_per_request_and_a_failure_stays_with_its_request(tmp_path):
    path = write(tmp_path, "import torch\ndef double(x):\n    if x.sum() < 0:\n        raise ValueError('negative')\n    return x * 2\n")
    stage = Function()
    stage.init({"function_file": str(path), "function": "double", "input": "tensor", "output": ""})
    batch = [{"data": torch.ones(2, 3)}, {"data": -torch.ones(1, 3)}, {"data": torch.arange(3.0)[None]}]
    stage.forward(batch)
    torch.testing.assert_close(batch[0]["result"], torch.full((2, 3), 2.0))
    assert "double raised ValueError: negative" in str(batch[1]["error"])
    torch.testing.assert_close(batch[2]["result"], torch.tensor([[0.0, 2.0, 4.0]]))


def test_a_file_that_builds_a_pipeline_when_imported_is_refused(tmp_path):
    path = write(
        tmp_path,
        "import tritonpipe\ndef f(data):\n    return data\n"
        "tritonpipe.load_graph({'backend': 'Identity'})\n",
    )
    params = {"function_file": str(path), "function": "f", "input": "bytes", "output": ""}
    with pytest.raises(ConfigError, match=r"builds a pipeline when it is imported.*if __name__ == \"__main__\":"):
        Function.infer(params, Function.entry_spec(params))
