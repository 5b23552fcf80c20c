"""cluster.yaml and the KubeRay manifests: valid for Ray, and able to run every job and Serve config we ship.

- cluster.yaml passes Ray's own schema and the launcher's fill-in + validation (offline; nothing calls AWS).
- Every resource request our configs make (derived with the library's own helpers: `TrainConfig.
  worker_resources`, `EncodeConfig.ray_remote_args`, the Serve deployments' `ray_actor_options`) fits a node
  type, GPU work lands only in its GPU pool, and the 8-worker training gang fits one 8-GPU node.
- A real autoscaling run (Ray's fake multi-node provider, node types mirroring cluster.yaml) scales an
  inference node up for the batch job, and removes it once idle. It runs in a subprocess (`python
  tests/test_cluster.py WORKDIR`) with its own head node, so the suite's in-process Ray is never touched.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
TRAIN_CONFIGS = sorted(ROOT.glob("jobs/configs/train_*.yaml"))
EMBED_CONFIGS = sorted(ROOT.glob("jobs/configs/embed_*.yaml"))
EVAL_CONFIGS = sorted(ROOT.glob("jobs/configs/eval_*.yaml"))
COMPARE_CONFIGS = sorted(ROOT.glob("jobs/configs/compare_*.yaml"))
SERVE_CONFIGS = [ROOT / "serve" / "config.yaml", ROOT / "serve" / "config_gpu.yaml"]
KUBERAY_MANIFESTS = [ROOT / "jobs" / "kuberay" / "rayjob_train.yaml", ROOT / "jobs" / "kuberay" / "rayjob_embed.yaml",
                     ROOT / "serve" / "rayservice.yaml"]


# ---------------------------------------------------------------------------------------------------------
# The checker: resource requests vs. node types


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_nodes: int


@dataclass(frozen=True)
class Request:
    what: str
    bundle: dict[str, float]  # one worker / actor / replica, as Ray's resource dict
    count: int = 1
    same_node: bool = False  # a gang that must share one node (Ray Train's PACKed placement group)


def per_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many copies of `bundle` one node with `resources` holds."""
    fits = [math.floor(resources.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(fits) if fits else 10**6


def fitting_types(req: Request, types: dict[str, NodeType]) -> list[str]:
    """Node types that can host the whole request (all copies; a gang on one node of that type)."""
    names = []
    for t in types.values():
        n = per_node(req.bundle, t.resources)
        if n and (n >= req.count if req.same_node else n * t.max_nodes >= req.count):
            names.append(t.name)
    return names


def placement_problems(requests: list[Request], types: dict[str, NodeType]) -> list[str]:
    return [f"{r.what}: {r.count} x {r.bundle}{' on one node' if r.same_node else ''} fits no node type "
            f"({', '.join(f'{t.name} {t.resources} x{t.max_nodes}' for t in types.values())})"
            for r in requests if not fitting_types(r, types)]


HEAD_NODE = {"node:__internal_head__": 1.0}  # Ray gives the head node this resource of its own


def cluster_node_types(cluster: dict) -> dict[str, NodeType]:
    head = cluster["head_node_type"]
    return {
        name: NodeType(name, {**{k: float(v) for k, v in t["resources"].items()}, **(HEAD_NODE if name == head else {})},
                       1 if name == head else t.get("max_workers", cluster.get("max_workers", 0)))
        for name, t in cluster["available_node_types"].items()
    }


def as_bundle(options: dict) -> dict[str, float]:
    """Ray remote/actor options ({num_cpus, num_gpus, resources}) as one resource dict."""
    from diffembed.config import ray_bundle

    return ray_bundle(options.get("num_cpus", 1), options.get("num_gpus", 0), options.get("resources"))


def train_requests(path: Path, overrides: list[str] | None = None) -> list[Request]:
    from diffembed.train.config import TrainConfig

    cfg = TrainConfig.from_yaml(path, overrides)
    return [Request(f"{path.name}: Ray Train worker", cfg.worker_resources(), cfg.run.num_workers, same_node=True)]


def embed_requests(path: Path, overrides: list[str] | None = None) -> list[Request]:
    from diffembed.batch.config import EmbedCorpusConfig

    cfg = EmbedCorpusConfig.from_yaml(path, overrides)
    return [Request(f"{path.name}: encoder actor", as_bundle(cfg.encode.ray_remote_args()), cfg.encode.actors)]


def evaluation_requests(cfg, label: str) -> list[Request]:
    """The evaluation's own task (when it asks for a GPU / pool) and, with the Qdrant backend, the batch job's actors."""
    reqs = [Request(f"{label}: evaluation task", cfg.compute.bundle())] if cfg.compute.remote else []
    if cfg.retrieval.backend == "qdrant":
        enc = cfg.retrieval.encode
        reqs.append(Request(f"{label}: encoder actor", as_bundle(enc.ray_remote_args()), enc.actors))
    return reqs


def eval_requests(path: Path) -> list[Request]:
    from diffembed.eval.config import EvalConfig

    return evaluation_requests(EvalConfig.from_yaml(path), path.name)


def compare_requests(path: Path) -> list[Request]:
    """Each backbone's training gang (its own overrides applied) and its evaluation."""
    from diffembed.eval.compare import CompareConfig

    cfg = CompareConfig.from_yaml(path)
    reqs = []
    for b in cfg.backbones:
        train = cfg.train_config(b)
        reqs.append(Request(f"{path.name}:{b.name}: Ray Train worker", train.worker_resources(), train.run.num_workers,
                            same_node=True))
        reqs += evaluation_requests(cfg.eval_config(b, "/export"), f"{path.name}:{b.name}")
    return reqs


def serve_requests(app: dict, label: str) -> list[Request]:
    """Every replica the app builder would start, with the options the library gives its deployments."""
    from diffembed.serving.config import ServeArgs
    from diffembed.serving.encoder import encoder_deployment
    from diffembed.serving.ingress import ingress_deployment
    from diffembed.serving.retriever import retriever_deployment

    args = ServeArgs.from_dict(app["args"], source=label)
    encoder = encoder_deployment(args)
    enc_replicas = args.encoder.autoscaling.max_replicas if args.encoder.autoscaling else encoder.num_replicas
    reqs = [Request(f"{label}: encoder replica", as_bundle(encoder.ray_actor_options), enc_replicas)]
    ingress = ingress_deployment(args)
    reqs.append(Request(f"{label}: ingress replica", as_bundle(ingress.ray_actor_options), ingress.num_replicas))
    if args.store is not None:
        retriever = retriever_deployment(args)
        reqs.append(Request(f"{label}: retriever replica", as_bundle(retriever.ray_actor_options),
                            retriever.num_replicas))
    return reqs


def serve_file_requests(path: Path) -> list[Request]:
    spec = yaml.safe_load(path.read_text())
    return [r for app in spec["applications"] for r in serve_requests(app, f"{path.name}:{app['name']}")]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def node_types(cluster) -> dict[str, NodeType]:
    return cluster_node_types(cluster)


# ---------------------------------------------------------------------------------------------------------
# (a) Ray's own validation


def test_cluster_yaml_passes_ray_schema_and_launcher_validation(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    filled = prepare_config(copy.deepcopy(cluster))  # merges aws/defaults.yaml, setup commands, min/max workers
    validate_config(filled)
    assert filled["provider"]["type"] == "aws"
    types = filled["available_node_types"]
    head = types[filled["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 4  # ingress, drivers
    assert any(t["resources"].get("GPU") == 8 and t.get("min_workers", 0) == 0 for t in types.values())
    assert any(t["resources"].get("GPU") == 1 and t.get("min_workers", 0) == 0 for t in types.values())
    assert filled["idle_timeout_minutes"] > 0
    # the project is synced and installed the way the Makefile does it (torch first, then the project)
    setup = filled["worker_setup_commands"]
    assert "~/diffembed" in filled["file_mounts"] and filled["file_mounts"]["~/diffembed"] == "."
    assert "torch==" in setup[0] and any("pip install" in c and "-e ." in c for c in setup[1:])
    assert all("RAY_AUTH_MODE=token" in " ".join(filled[k]) for k in ("head_start_ray_commands",
                                                                        "worker_start_ray_commands"))


def test_ray_validation_catches_a_broken_cluster_yaml(cluster):
    """The validation above can fail: a node type without resources, or an unknown key, is rejected."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = copy.deepcopy(cluster)
    del broken["available_node_types"]["gpu_infer"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(cluster)
    broken["idle_timeout"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout"):
        jsonschema.validate(broken, schema)


# ---------------------------------------------------------------------------------------------------------
# (b) every request our configs make fits a node type of cluster.yaml


def test_every_config_request_fits_the_cluster(node_types):
    requests = [r for p in TRAIN_CONFIGS for r in train_requests(p)]
    requests += [r for p in EMBED_CONFIGS for r in embed_requests(p)]
    requests += [r for p in SERVE_CONFIGS for r in serve_file_requests(p)]
    requests += [r for p in EVAL_CONFIGS for r in eval_requests(p)]
    requests += [r for p in COMPARE_CONFIGS for r in compare_requests(p)]
    assert len(requests) >= 3 + 2 + 5 + 1 + 6
    assert placement_problems(requests, node_types) == []


@pytest.mark.parametrize("path", [p for p in TRAIN_CONFIGS if "tiny" not in p.name], ids=lambda p: p.name)
def test_gpu_training_gang_fits_one_8gpu_node_with_room_left(path, node_types):
    (req,) = train_requests(path)
    assert req.count == 8 and req.bundle["GPU"] == 1 and req.bundle.get("train_node") == 1
    assert fitting_types(req, node_types) == ["gpu_train"]
    node = node_types["gpu_train"].resources
    assert node["GPU"] == req.count * req.bundle["GPU"]
    # CPUs left on the node after the 8 workers: Ray Data reading the training set, the driver, the controller
    assert node["CPU"] - req.count * req.bundle["CPU"] >= 8


def test_gpu_evaluations_run_in_the_inference_pool(node_types):
    reqs = eval_requests(ROOT / "jobs/configs/eval_longembed_dream.yaml")
    reqs += [r for r in compare_requests(ROOT / "jobs/configs/compare_7b.yaml") if "evaluation" in r.what]
    assert len(reqs) == 4
    for req in reqs:
        assert req.bundle.get("GPU") == 1 and fitting_types(req, node_types) == ["gpu_infer"], req
    for req in compare_requests(ROOT / "jobs/configs/compare_7b.yaml"):
        if "Train" in req.what:
            assert fitting_types(req, node_types) == ["gpu_train"], req


@pytest.mark.parametrize("path, pool", [
    (ROOT / "jobs/configs/embed_gpu_dream.yaml", "gpu_infer"),
    (ROOT / "serve/config_gpu.yaml", "gpu_infer"),
    (ROOT / "jobs/configs/embed_cpu.yaml", None),
    (ROOT / "serve/config.yaml", None),
], ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_inference_work_lands_in_its_pool(path, pool, node_types):
    reqs = embed_requests(path) if path.parent.name == "configs" else serve_file_requests(path)
    encoders = [r for r in reqs if "encoder" in r.what]
    assert encoders
    for req in encoders:
        where = fitting_types(req, node_types)
        if pool:  # GPU work: only its GPU pool, never the head or the training nodes
            assert req.bundle.get("GPU", 0) >= 1 and where == [pool], (req, where)
        else:  # the CPU defaults run on the head (or CPU workers), no GPU needed
            assert "GPU" not in req.bundle and "head" in where, (req, where)
    for req in reqs:  # ingress / retriever are CPU-only: the head can host them
        if "encoder" not in req.what:
            assert "GPU" not in req.bundle and "head" in fitting_types(req, node_types)
        if "retriever" in req.what and path.name == "config.yaml":  # an embedded (Edge) store: on the head only,
            assert fitting_types(req, node_types) == ["head"] and req.count == 1  # where submitted jobs wrote it


def test_checker_reports_unsatisfiable_requests(node_types):
    """Negative cases: requests that no node type can hold are reported, each with its reason."""
    dream = ROOT / "jobs/configs/train_dream7b_lora.yaml"
    embed = ROOT / "jobs/configs/embed_gpu_dream.yaml"
    bad = (
        train_requests(dream, ["run.num_workers=16"])  # 16 GPUs as one gang: no 16-GPU node
        + train_requests(dream, ["run.cpus_per_worker=16"])  # 8 x 16 CPUs > 96
        + embed_requests(embed, ["encode.resources_per_actor={tpu_pod: 1}"])  # a pool that does not exist
        + embed_requests(embed, ["encode.actors=13"])  # 13 GPU actors > 12 inference nodes
    )
    problems = placement_problems(bad, node_types)
    assert len(problems) == 4, problems
    assert "16 x" in problems[0] and "on one node" in problems[0] and "tpu_pod" in problems[2]
    # and the same checker passes the shipped settings
    assert placement_problems(train_requests(dream) + embed_requests(embed), node_types) == []


@pytest.mark.parametrize("section, field", [
    ("run", "resources_per_worker"), ("encode", "resources_per_actor"), ("encoder", "resources")])
def test_custom_resource_fields_reject_bad_values_in_one_line(section, field):
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.config import ConfigError
    from diffembed.serving.config import ServeArgs
    from diffembed.train.config import TrainConfig

    model, base = {
        "run": (TrainConfig, {"data": {"train_files": ["x.jsonl"]}}),
        "encode": (EmbedCorpusConfig, {"input": {"paths": ["x.jsonl"]}}),
        "encoder": (ServeArgs, {}),
    }[section]
    for value, needle in [("{GPU: 1}", "'GPU' is not a custom resource"), ("{pool: 0}", "positive"),
                          ("{pool: 0.00001}", "precision"), ("[pool]", "dictionary")]:
        with pytest.raises(ConfigError) as err:
            model.from_dict(base, [f"{section}.{field}={value}"])
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    ok = model.from_dict(base, [f"{section}.{field}={{inference_node: 1}}"])
    assert getattr(getattr(ok, section), field) == {"inference_node": 1.0}


def test_library_requests_carry_the_custom_resources():
    """The helpers the checker uses are what the jobs hand to Ray: ScalingConfig, map_batches, ray_actor_options."""
    from diffembed.batch.config import EncodeConfig
    from diffembed.serving.config import ServeArgs
    from diffembed.serving.encoder import encoder_deployment
    from diffembed.train.config import TrainConfig

    train = TrainConfig.from_yaml(ROOT / "jobs/configs/train_dream7b_lora.yaml")
    assert train.worker_resources() == {"CPU": 8.0, "GPU": 1.0, "train_node": 1.0}
    assert TrainConfig.from_yaml(ROOT / "jobs/configs/train_tiny.yaml").worker_resources() == {"CPU": 1.0}
    assert EncodeConfig(num_gpus_per_actor=1, resources_per_actor={"inference_node": 1}).ray_remote_args() == {
        "num_cpus": 1, "num_gpus": 1, "resources": {"inference_node": 1.0}}
    assert EncodeConfig().ray_remote_args() == {"num_cpus": 1}
    args = ServeArgs.model_validate({"encoder": {"num_gpus": 1, "resources": {"inference_node": 1}}})
    assert encoder_deployment(args).ray_actor_options == {"num_cpus": 1, "num_gpus": 1,
                                                          "resources": {"inference_node": 1.0}}
    from diffembed.train.loop import scaling_config

    scaling = scaling_config(train)  # what train() hands to the TorchTrainer
    assert (scaling.num_workers, scaling.use_gpu) == (8, True)
    assert scaling.resources_per_worker == {"CPU": 8.0, "GPU": 1.0, "train_node": 1.0}
    # (the batch job's map_batches arguments are exercised for real by the autoscaling test below)


# ---------------------------------------------------------------------------------------------------------
# KubeRay: RayJob / RayService manifests mirror cluster.yaml


def kuberay_group_type(name: str, group: dict, max_nodes: int) -> NodeType:
    """A head/worker group as a node type: rayStartParams first (what Ray advertises), else container limits."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    resources = {
        "CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    if "resources" in params:  # KubeRay's quoting: '"{\"train_node\": 8}"'
        resources.update({k: float(v) for k, v in json.loads(params["resources"].strip("'\"").replace('\\"', '"')).items()})
    return NodeType(name, {k: v for k, v in resources.items() if v}, max_nodes)


def kuberay_node_types(cluster_spec: dict) -> dict[str, NodeType]:
    head = kuberay_group_type("head", cluster_spec["headGroupSpec"], 1)
    types = {"head": NodeType("head", {**head.resources, **HEAD_NODE}, 1)}
    for group in cluster_spec.get("workerGroupSpecs", []):
        types[group["groupName"]] = kuberay_group_type(group["groupName"], group, group.get("maxReplicas", 0))
    return types


def entrypoint_files(entrypoint: str) -> tuple[Path, Path, list[str]]:
    """`python jobs/x.py --config jobs/configs/y.yaml k=v ...` -> (script, config, overrides)."""
    words = entrypoint.split()
    script = next(w for w in words if w.endswith(".py"))
    config = words[words.index("--config") + 1]
    overrides = [w for w in words[words.index("--config") + 2:] if "=" in w]
    return ROOT / script, ROOT / config, overrides


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS[:2], ids=lambda p: p.name)
def test_kuberay_rayjob_manifests(path):
    spec = yaml.safe_load(path.read_text())
    assert (spec["apiVersion"], spec["kind"]) == ("ray.io/v1", "RayJob")
    script, config, overrides = entrypoint_files(spec["spec"]["entrypoint"])
    assert script.is_file() and config.is_file(), (script, config)
    cluster_spec = spec["spec"]["rayClusterSpec"]
    types = kuberay_node_types(cluster_spec)
    assert "GPU" not in types["head"].resources
    requests = (train_requests if script.name == "train.py" else embed_requests)(config, overrides)
    assert placement_problems(requests, types) == []
    gpu_groups = [g for g in cluster_spec["workerGroupSpecs"] if "nvidia.com/gpu" in
                  g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g.get("minReplicas", 0) == 0 for g in gpu_groups)  # scale from zero
    assert cluster_spec.get("enableInTreeAutoscaling") is True
    images = {c["image"] for g in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1  # one image everywhere
    # the same custom resources as cluster.yaml's pools
    cluster = cluster_node_types(yaml.safe_load(CLUSTER_YAML.read_text()))
    for name, t in types.items():
        custom = {k: v for k, v in t.resources.items() if k not in ("CPU", "GPU", *HEAD_NODE)}
        if custom:
            assert any(custom.items() <= c.resources.items() and c.resources.get("GPU") == t.resources.get("GPU")
                       for c in cluster.values()), (name, t)


def test_kuberay_rayservice_manifest():
    spec = yaml.safe_load((ROOT / "serve" / "rayservice.yaml").read_text())
    assert (spec["apiVersion"], spec["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(spec["spec"]["serveConfigV2"])
    gpu_config = yaml.safe_load((ROOT / "serve" / "config_gpu.yaml").read_text())
    # same applications as serve/config_gpu.yaml (content, not text), each validating through ServeArgs
    assert serve_config["applications"] == gpu_config["applications"]
    types = kuberay_node_types(spec["spec"]["rayClusterConfig"])
    requests = [r for app in serve_config["applications"] for r in serve_requests(app, f"rayservice:{app['name']}")]
    assert placement_problems(requests, types) == []
    encoder = next(r for r in requests if "encoder" in r.what)
    assert "head" not in fitting_types(encoder, types)


def test_kuberay_checker_catches_a_group_without_the_pool_resource():
    spec = yaml.safe_load((ROOT / "jobs" / "kuberay" / "rayjob_train.yaml").read_text())
    cluster_spec = spec["spec"]["rayClusterSpec"]
    for group in cluster_spec["workerGroupSpecs"]:
        group["rayStartParams"].pop("resources", None)
    script, config, overrides = entrypoint_files(spec["spec"]["entrypoint"])
    assert placement_problems(train_requests(config, overrides), kuberay_node_types(cluster_spec))


# ---------------------------------------------------------------------------------------------------------
# (c) autoscaling with Ray's fake multi-node provider (run in a subprocess: `python tests/test_cluster.py DIR`)


def fake_autoscaling_config(cluster: dict, gcs_address: str, idle_minutes: float) -> dict:
    """cluster.yaml's worker types for the fake provider: same GPUs and custom resources, 1 CPU each."""
    workers = {}
    for name, t in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        resources = {**t["resources"], "CPU": 1, "object_store_memory": 100 * 1024**2}
        workers[name] = {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return {
        "cluster_name": "diffembed-fake",
        "max_workers": len(workers),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {**workers, "ray.head.default": {
            "resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_minutes, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def run_autoscaling_embed(work: Path) -> dict:
    """Start a fake autoscaling cluster, run the batch job on it, report what the autoscaler did (as JSON)."""
    import secrets

    from ray_head import free_port, ray_head

    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    import ray

    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    port = free_port()
    config_path = work / "autoscaling.json"
    config_path.write_text(json.dumps(fake_autoscaling_config(
        cluster, f"{ray.util.get_node_ip_address()}:{port}", idle_minutes=0.1)))
    with ray_head(work, num_cpus=2, port=port, dashboard=False,
                  extra_args=[f"--autoscaling-config={config_path}", "--num-gpus=0",
                              f"--object-store-memory={150 * 1024**2}"],
                  extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as head:
        return _embed_on_autoscaling_cluster(head.gcs_address, work)


def _embed_on_autoscaling_cluster(address: str, work: Path) -> dict:
    import ray

    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    result: dict = {"launched": []}
    stop = threading.Event()
    t0 = time.monotonic()

    def watch():  # every worker node that ever came up, with its resources
        seen = set()
        while not stop.is_set():
            for n in ray.nodes():
                res = n.get("Resources", {})
                if n["Alive"] and n["NodeID"] not in seen | head_ids:
                    seen.add(n["NodeID"])
                    result["launched"].append({"node_id": n["NodeID"], "at_s": round(time.monotonic() - t0, 1),
                                               "resources": {k: v for k, v in res.items()
                                                             if not k.startswith("node:")}})
            stop.wait(0.5)

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        head_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        result["workers_at_start"] = len(head_ids) - 1
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        corpus = work / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"note {i}: the harbour lights at dusk"})
                                  + "\n" for i in range(24)))
        gpu = EmbedCorpusConfig.from_yaml(ROOT / "jobs/configs/embed_gpu_dream.yaml")
        cfg = EmbedCorpusConfig.from_dict({
            "input": {"paths": [str(corpus)]},
            "encode": {"actors": 1, "cpus_per_actor": 1, "batch_size": 8,
                       "num_gpus_per_actor": gpu.encode.num_gpus_per_actor,
                       "resources_per_actor": gpu.encode.resources_per_actor},
            "store": {"path": str(work / "qdrant"), "collection": "docs"},
        })
        result["remote_args"] = cfg.encode.ray_remote_args()
        started = time.monotonic()
        result["summary"] = embed_corpus(cfg, progress=False)
        result["job_s"] = round(time.monotonic() - started, 1)

        @ray.remote(**cfg.encode.ray_remote_args())
        def probe() -> dict:
            import torch

            from diffembed import Embedder, EmbedderConfig

            emb = Embedder(EmbedderConfig())
            return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_available": torch.cuda.is_available(),
                    "device": str(emb.device), "vector_norm": float((emb.encode_documents(["harbour"]) ** 2).sum()),
                    "node_id": ray.get_runtime_context().get_node_id()}

        result["probe"] = ray.get(probe.remote(), timeout=120)

        # every worker node goes away once idle (idle_timeout_minutes 0.1 = 6 s)
        deadline = time.monotonic() + 90
        while True:
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] in
                     {x["node_id"] for x in result["launched"]}]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(1)
        result["workers_alive_at_end"] = len(alive)
        result["idle_removed_after_s"] = round(time.monotonic() - started - result["job_s"], 1)
    finally:
        stop.set()
        ray.shutdown()
    return result


def test_autoscaling_embed_job_scales_an_inference_node_up_and_down(tmp_path):
    """Batch job with the GPU config's resource requests on cluster.yaml's pools (fake provider, fake GPUs)."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    log = (tmp_path / "head.log").read_text() if (tmp_path / "head.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:] + log[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["workers_at_start"] == 0
    assert result["remote_args"]["num_gpus"] == 1 and result["remote_args"]["resources"] == {"inference_node": 1}
    summary = result["summary"]
    assert summary["documents_embedded"] == 24 and summary["points_in_collection"] == 24
    # the job scaled up exactly the inference pool: a 1-GPU node with the pool's resource, nothing else
    launched = [n["resources"] for n in result["launched"]]
    assert launched and all(r.get("inference_node") == 1 and r.get("GPU") == 1 for r in launched), launched
    # on a fake GPU Ray sets CUDA_VISIBLE_DEVICES; torch (CPU build) sees no CUDA, the Embedder runs on CPU
    probe = result["probe"]
    assert probe["gpu_ids"] and probe["cuda_visible_devices"] == ",".join(probe["gpu_ids"])
    assert probe["device"] == "cpu" and not probe["cuda_available"]
    assert probe["node_id"] in {n["node_id"] for n in result["launched"]}
    assert abs(probe["vector_norm"] - 1) < 1e-4
    # and the idle node was removed
    assert result["workers_alive_at_end"] == 0, result


if __name__ == "__main__":
    out = run_autoscaling_embed(Path(sys.argv[1]))
    print(json.dumps(out), flush=True)
