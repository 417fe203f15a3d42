"""Kubernetes manifests from tritonpipe generate --k8s, checked offline.

The overlays are rendered by ``kubectl kustomize`` (skipped where kubectl is not on PATH), as
``kubectl apply -k`` renders them.  Every rendered object (base + each overlay, each repository
component) is validated against the Kubernetes API's own JSON schemas as bundled by
kubernetes-validate (strict: unknown fields fail).
The ServiceMonitor is a Prometheus Operator CRD that kubernetes-validate does not bundle; its
fields are checked one by one against what the Service offers.  What the image serves is read
from docker/Dockerfile and docker/compose.yaml, and the readiness path from the server owner.
"""

import json
import math
import re
import shlex
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe import load_graph
from tritonpipe.contract import warmup_batches
from tritonpipe.deploy import components, estimates, image, k8s
from tritonpipe.deploy.manifests import HPA_METRIC, app_name
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

ROOT = Path(__file__).resolve().parents[3]
OVERLAYS = ("cpu", "gpu", "mig")
COMPONENTS = ("repository-pvc", "repository-s3", "repository-gcs", "repository-configmap")
#: the oldest release still commonly run, and the newest whose schemas kubernetes-validate bundles
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CRDS = {"ServiceMonitor"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_onnx):
    graph = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
            "max": 8, "instance_num": 2, "batching_timeout": 0,
        },
        name="cls_model",
    )
    return generate_repository(graph, tmp_path_factory.mktemp("k8s") / "repo")


@pytest.fixture(scope="module")
def written(repo, tmp_path_factory):
    manifests = k8s.build_manifests(repo.configs, repo.path, repo.entry)
    folder = k8s.write_manifests(manifests, tmp_path_factory.mktemp("out") / "k8s")
    return manifests, folder


def _render(kustomize, folder: Path, overlay: str, component: str | None = None) -> list[dict]:
    if component is None:
        return kustomize(folder / "overlays" / overlay)
    # a copy of the folder whose overlay has its components line changed, as a user would change it
    variant = folder.parent / "variants" / f"{overlay}-{component}"
    if not variant.exists():
        shutil.copytree(folder, variant)
        spec = variant / "overlays" / overlay / "kustomization.yaml"
        text = spec.read_text()
        assert text.count("../../components/repository-pvc") == 1
        spec.write_text(text.replace("../../components/repository-pvc", f"../../components/{component}"))
    return kustomize(variant / "overlays" / overlay)


def _one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _dockerfile() -> tuple[set[int], list[str]]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    (cmd,) = re.findall(r"^CMD\s+(.+)$", text, re.M)
    return exposed, json.loads(cmd)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_rendered_object_validates_against_the_api_schemas(written, overlay, component, kustomize):
    _, folder = written
    objects = _render(kustomize, folder, overlay, component)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"}
    for obj in objects:
        if obj["kind"] in CRDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_whole_object_file_validates_as_written(written):
    """Files that are objects on their own (not patches, not kustomizations) validate unrendered."""
    _, folder = written
    checked = 0
    for path in sorted(folder.rglob("*.yaml")):
        if path.name in ("kustomization.yaml", "patch.yaml") or path.parent.name == "monitoring":
            continue
        obj = yaml.safe_load(path.read_text())
        if obj["kind"] in CRDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        checked += 1
    assert checked >= 5  # deployment, service, hpa, pvc, configmap


def test_the_validator_is_not_a_rubber_stamp(written, kustomize):
    deployment = _one(_render(kustomize, written[1], "gpu"), "Deployment")
    _container(deployment)["startupProbe"]["failureTreshold"] = 3  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = _one(_render(kustomize, written[1], "gpu"), "Deployment")
    _container(deployment)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_every_file_is_commented_yaml(written):
    _, folder = written
    for path in folder.rglob("*.yaml"):
        text = path.read_text()
        assert yaml.safe_load(text), path
        if path.name != "patch.yaml" or path.parent.name in OVERLAYS:
            assert "\n# " in "\n" + text or "  # " in text, f"{path} has no comment"


def test_service_monitor_fields(written, kustomize):
    """No offline CRD schema: check each field the ServiceMonitor sets against the Service."""
    objects = _render(kustomize, written[1], "cpu")
    monitor, service = _one(objects, "ServiceMonitor"), _one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports[endpoint["port"]] == image.PORTS["metrics"]
    assert endpoint["path"] == image.METRICS_PATH
    assert re.fullmatch(r"\d+s", endpoint["interval"])


def test_hpa_scales_the_deployment_on_the_adapter_metric(written, repo, kustomize):
    manifests, folder = written
    objects = _render(kustomize, folder, "gpu")
    hpa, deployment = _one(objects, "HorizontalPodAutoscaler"), _one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    values = yaml.safe_load((folder / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.search(rule["name"]["matches"], image.QUEUE_METRIC)
    query = rule["metricsQuery"]
    # queue time over successful requests, both of the entry model, per pod
    queue, success = query.split(" / ")
    assert image.QUEUE_METRIC in queue and image.SUCCESS_METRIC in success
    assert query.count(f'model="{repo.entry}"') == 2 and "<<.GroupBy>>" in query
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- what the image serves --------------------------------------------------------------------


def test_ports_and_command_match_the_dockerfile(written, kustomize):
    exposed, cmd = _dockerfile()
    assert exposed == set(image.PORTS.values())
    assert cmd == [image.SERVER_BINARY, f"--model-repository={image.MODELS_MOUNT}"]
    for overlay in OVERLAYS:
        deployment = _one(_render(kustomize, written[1], overlay), "Deployment")
        container = _container(deployment)
        # args replace the image's CMD and keep its entrypoint, as docker run does
        assert "command" not in container
        args = container["args"]
        assert args[0] == cmd[0]
        env = {e["name"]: e["value"] for e in container["env"]}
        expanded = [a.replace("$(MODEL_REPOSITORY)", env["MODEL_REPOSITORY"]) for a in args]
        assert expanded[:2] == cmd
        assert "--strict-readiness=true" in args
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == image.PORTS
        flags = dict(a.split("=", 1) for a in args[1:])
        assert {flags[f"--{n}-port"] for n in ("http", "grpc", "metrics")} == {str(p) for p in exposed}
        for probe, path in (("startupProbe", image.READY_PATH), ("livenessProbe", image.LIVE_PATH), ("readinessProbe", image.READY_PATH)):
            get = container[probe]["httpGet"]
            assert get["path"] == path and ports[get["port"]] == image.PORTS["http"]
        assert int(flags["--exit-timeout-secs"]) < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_compose_runs_the_same_server():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    command = compose["services"]["tritonpipe"]["command"]
    _, cmd = _dockerfile()
    assert command[:2] == cmd
    assert f"--exit-timeout-secs={image.EXIT_TIMEOUT_S}" in command
    assert {int(p.rsplit(":", 2)[-1]) for p in compose["services"]["tritonpipe"]["ports"]} == set(image.PORTS.values())


def test_the_server_owner_waits_on_the_readiness_path(repo, monkeypatch):
    server = TritonServer(repo.path)
    asked = []

    class Running:
        def poll(self):
            return None

    monkeypatch.setattr(server, "_get", lambda path: asked.append(path) or 200)
    server.process = Running()
    server.wait_ready(timeout=5)
    assert asked == [image.READY_PATH]
    # the owner passes the port flags the manifests use, by the same names
    names = {a.split("=", 1)[0] for a in server.command()}
    assert {f"--{n}-port" for n in image.PORTS} <= names and "--exit-timeout-secs" in names
    server._workdir.cleanup()


# --- numbers from the repository --------------------------------------------------------------


def test_shm_size_follows_the_stated_formula(written, repo, kustomize):
    manifests, folder = written
    mib = 1 << 20
    expected = {}
    for name, config in repo.configs.items():
        if config.backend != "python":
            continue
        request = 0
        for tensor in list(config.input) + list(config.output):
            if any(d < 0 for d in tensor.dims):
                request += 4 * mib  # an encoded image
            else:
                size = {mc.TYPE_UINT8: 1, mc.TYPE_FP32: 4}[tensor.data_type]
                request += size * math.prod(tensor.dims)
        count = sum(g.count for g in config.instance_group)
        expected[name] = count * (1 * mib + config.max_batch_size * request)
    assert manifests.shm.per_model == expected
    # cls_model_pre: 2 x (1 MiB + 8 x (4 MiB + 3x32x32 FP32)); cls_model_model: 2 x (1 MiB + 8 x (12288 + 40) B)
    assert expected["cls_model_pre"] == 2 * (mib + 8 * (4 * mib + 12288))
    total = 64 * mib * math.ceil((2 * sum(expected.values()) + 64 * mib) / (64 * mib))
    assert manifests.shm.total == total == 256 * mib
    deployment = _one(_render(kustomize, folder, "mig"), "Deployment")
    (dshm,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
    mounts = {m["name"]: m["mountPath"] for m in _container(deployment)["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm" and mounts["models"] == image.MODELS_MOUNT
    text = (folder / "base" / "deployment.yaml").read_text()
    assert "# /dev/shm holds the Python backend's shared-memory regions" in text and "round_up(" in text


def test_startup_probe_allows_for_every_model(written, repo, kustomize):
    manifests, folder = written
    cpu, gpu, mig = (manifests.startup[o] for o in OVERLAYS)
    assert {m.name for m in gpu.models} == set(repo.configs)
    # on a GPU each of the two instances builds a TensorRT engine from the ONNX file and warms up
    (model,) = [m for m in gpu.models if m.name == "cls_model_model"]
    assert any("2 x" in p and "TensorRT build" in p for p in model.parts)
    assert any("warm-up" in p for p in model.parts)
    assert not any("TensorRT" in p or "warm-up" in p for m in cpu.models for p in m.parts)
    assert cpu.seconds < gpu.seconds < mig.seconds
    for overlay, estimate in zip(OVERLAYS, (cpu, gpu, mig)):
        probe = _container(_one(_render(kustomize, folder, overlay), "Deployment"))["startupProbe"]
        allowed = probe["periodSeconds"] * probe["failureThreshold"]
        assert allowed >= estimates.STARTUP_SAFETY * estimate.seconds
        assert allowed < estimates.STARTUP_SAFETY * estimate.seconds + 6 * probe["periodSeconds"] or allowed == 6 * probe["periodSeconds"]
        text = (folder / "overlays" / overlay / "patch.yaml").read_text()
        assert "startup estimate on" in text and f"{estimate.seconds:.0f} s" in text


def test_a_plan_cache_means_one_build(repo, tmp_path, tiny_onnx):
    graph = load_graph(
        {"backend": "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]", "resize_h": 32, "resize_w": 32,
         "model": str(tiny_onnx), "model::cache": "tiny.plan", "instance_num": 3, "max": 2},
        name="cached",
    )
    cached = generate_repository(graph, tmp_path / "repo")
    estimate = estimates.estimate_startup(cached.configs, cached.path, gpu=True)
    (model,) = [m for m in estimate.models if m.name == "cached_model"]
    assert any(p.startswith("1 x") and "TensorRT build" in p for p in model.parts)


def test_the_warm_up_estimate_counts_the_batch_sizes_the_model_warms_up_with(written, repo):
    manifests, _ = written
    (model,) = [m for m in manifests.startup["gpu"].models if m.name == "cls_model_model"]
    (part,) = [p for p in model.parts if "warm-up" in p]
    batches = warmup_batches(repo.configs["cls_model_model"].max_batch_size)
    assert batches == [8, 4, 2, 1] and f" x {len(batches)} batch sizes x " in part
    assert [warmup_batches(n) for n in (0, 1, 2, 12)] == [[1], [1], [2, 1], [12, 8, 4, 2, 1]]


def test_configmap_holds_the_whole_repository(written, repo, kustomize):
    _, folder = written
    deployment = _one(_render(kustomize, folder, "cpu", "repository-configmap"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (files,) = [v for v in pod["volumes"] if v["name"] == "repository-files"]
    paths = {item["path"] for item in files["configMap"]["items"]}
    on_disk = {p.relative_to(repo.path).as_posix() for p in repo.path.rglob("*") if p.is_file()}
    assert paths == on_disk and "cls_model_model/1/tiny.onnx" in paths
    configmap = yaml.safe_load((folder / "components" / "repository-configmap" / "configmap.yaml").read_text())
    keys = {i["path"]: i["key"] for i in files["configMap"]["items"]}
    assert configmap["data"][keys["cls_model/config.pbtxt"]] == (repo.path / "cls_model" / "config.pbtxt").read_text()
    assert keys["cls_model_model/1/tiny.onnx"] in configmap["binaryData"]
    (copy,) = pod["initContainers"]
    assert copy["image"] == _container(deployment)["image"]


def test_a_repository_too_large_for_a_configmap_gets_no_configmap_component(repo, tmp_path, monkeypatch):
    monkeypatch.setattr(components, "CONFIGMAP_LIMIT", 1000)
    folder = k8s.write_manifests(k8s.build_manifests(repo.configs, repo.path, repo.entry), tmp_path / "k8s")
    assert not (folder / "components" / "repository-configmap").exists()
    assert "more than a ConfigMap holds" in (folder / "base" / "kustomization.yaml").read_text()
    assert "repository-configmap" not in (folder / "overlays" / "cpu" / "kustomization.yaml").read_text()


def test_object_storage_components_point_the_server_at_a_bucket(written, kustomize):
    for component, scheme in (("repository-s3", "s3://"), ("repository-gcs", "gs://")):
        deployment = _one(_render(kustomize, written[1], "gpu", component), "Deployment")
        container = _container(deployment)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MODEL_REPOSITORY"].startswith(scheme)
        assert "--model-repository=$(MODEL_REPOSITORY)" in container["args"]
        assert "models" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_overlays_ask_for_their_devices_and_run_as_non_root(written, kustomize):
    limits = {}
    for overlay in OVERLAYS:
        deployment = _one(_render(kustomize, written[1], overlay), "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert _container(deployment)["securityContext"]["allowPrivilegeEscalation"] is False
        limits[overlay] = {k for k in _container(deployment)["resources"]["limits"] if k.startswith("nvidia.com/")}
        assert _container(deployment)["image"].startswith("registry.example.com/tritonpipe:")
    assert limits == {"cpu": set(), "gpu": {"nvidia.com/gpu"}, "mig": {"nvidia.com/mig-1g.10gb"}}


def test_names_are_valid_labels():
    for entry in ("resnet18", "Cls_Model", "a.b.c", "x" * 100):
        name = app_name(entry)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63


# --- the command line -------------------------------------------------------------------------


def _generate(argv):
    from tritonpipe_tools.generate import main

    return main(argv)


def test_cli_writes_the_repository_and_the_manifests(tmp_path, capsys, kustomize):
    assert _generate(["--backend", "S[DecodeMat,ResizeMat]", "--set", "resize_h=8", "--set", "resize_w=8",
                      "-o", str(tmp_path / "repo"), "--k8s", str(tmp_path / "k8s")]) == 0
    out = capsys.readouterr().out
    assert "/dev/shm" in out and "kubectl apply -k" in out
    for overlay in OVERLAYS:
        assert _one(kustomize(tmp_path / "k8s" / "overlays" / overlay), "Deployment")


@pytest.mark.parametrize(
    "where, words",
    [
        ("file", "is not a folder"),
        ("inside", "must not contain each other"),
        ("full", "is not empty"),
        ("under-file", "is not a folder"),
    ],
)
def test_cli_rejects_a_bad_k8s_folder_before_writing(tmp_path, capsys, where, words):
    repo = tmp_path / "repo"
    target = {"file": tmp_path / "f", "inside": repo / "k8s", "full": tmp_path / "full", "under-file": tmp_path / "f" / "k8s"}[where]
    (tmp_path / "f").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    code = _generate(["--backend", "S[DecodeMat]", "-o", str(repo), "--k8s", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not repo.exists()


def test_cli_k8s_with_dry_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _generate(["--backend", "S[DecodeMat]", "--dry-run", "--k8s", str(tmp_path / "k8s")])
    assert info.value.code == 2 and "--k8s" in capsys.readouterr().err
    assert not (tmp_path / "k8s").exists()


def test_the_readme_applies_the_overlays_it_documents():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line.strip()) for line in section.splitlines() if line.strip().startswith("kubectl apply -k")]
    assert commands and all(c[3].split("/")[-1] in OVERLAYS for c in commands)
    assert HPA_METRIC in section and image.QUEUE_METRIC in section
