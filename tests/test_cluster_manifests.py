"""KubeRay manifests under cluster/, validated offline (cluster/validate.py): RayCluster/RayJob strictly
against the KubeRay CRDs, core kinds with kubernetes-validate --strict, consistency with the repo
and the run configs; and planted errors (a mutated copy) that the validator must reject."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # cluster/ is not part of the installed library
from cluster import validate as k8s  # noqa: E402

pytestmark = pytest.mark.unit
VARIANTS = ("small", "large")
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"


def _has_core_validator() -> bool:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        return False
    return True


needs_core = pytest.mark.skipif(
    not _has_core_validator(),
    reason="kubernetes-validate is not installed (pip install kubernetes-validate; it is in the test extra)",
)


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[k8s.Manifest]]:
    return {v: k8s.load_manifests(k8s.variant_paths(v)) for v in VARIANTS}


def _one(ms: list[k8s.Manifest], kind: str) -> k8s.Manifest:
    found = [m for m in ms if m.kind == kind]
    assert len(found) == 1, f"expected one {kind}, found {[m.label for m in found]}"
    return found[0]


def _group(spec: dict, name: str) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


# ------------------------------------------------------------------------------ the CRD schemas


def test_crd_copies_match_shared():
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} not present; the repo's copies in cluster/crds/ are used")
    for name in k8s.CRD_FILES.values():
        assert (ROOT / "cluster" / "crds" / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), name


def test_crd_to_json_schema_rules():
    import jsonschema

    node = {
        "type": "object",
        "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": "^[0-9]+m?$",
                  "x-kubernetes-int-or-string": True},
            "t": {"type": "string", "nullable": True, "format": "date-time"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "closed": {"type": "object"},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
            "n": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
        },
        "x-kubernetes-validations": [{"rule": "self == oldSelf"}],
    }
    v = jsonschema.Draft202012Validator(k8s.crd_to_json_schema(node))
    ok = {"q": 3, "t": None, "free": {"anything": [1]}, "closed": {}, "m": {"a": "b"}, "n": 1}
    assert list(v.iter_errors(ok)) == []
    assert v.is_valid({"q": "3m"})  # a string matching the quantity pattern
    for bad in ({"q": 1.5}, {"q": "x"}, {"t": 5}, {"closed": {"x": 1}}, {"m": {"a": 1}}, {"n": 0}, {"zzz": 1}):
        assert not v.is_valid(bad), bad


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_validate_strictly(manifests, variant):
    ms = manifests[variant]
    custom = [m for m in ms if m.kind in k8s.CRD_FILES]
    assert {m.kind for m in custom} == {"RayCluster", "RayJob"}
    for m in custom:
        assert k8s.validate_custom(m.obj) == [], m.label


@needs_core
@pytest.mark.parametrize("variant", VARIANTS)
def test_core_kinds_validate_strictly(manifests, variant):
    core = [m for m in manifests[variant] if m.kind not in k8s.CRD_FILES]
    assert {"Secret", "Deployment", "Service", "PersistentVolumeClaim"} <= {m.kind for m in core}
    for m in core:
        assert k8s.validate_core(m.obj) == [], m.label


@needs_core
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_consistent(manifests, variant):
    assert k8s.check_consistency(manifests[variant]) == []
    assert k8s.validate_manifests(manifests[variant]) == []


@needs_core
def test_cli_validates_every_variant(capsys):
    assert k8s.main(list(VARIANTS)) == 0
    out = capsys.readouterr().out
    assert "small: OK" in out and "large: OK" in out


# ------------------------------------------------------------------- what the manifests must say


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_carry_the_required_settings(manifests, variant):
    ms = manifests[variant]
    job = _one(ms, "RayJob").obj["spec"]
    assert shlex.split(job["entrypoint"]) == [
        "python", "jobs/train_curriculum.py", "--config", f"configs/cluster-{variant}.yaml"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["submitterConfig"]["backoffLimit"] >= 1
    spec = job["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    assert {"upscalingMode", "idleTimeoutSeconds"} <= set(spec["autoscalerOptions"])
    rollout = _group(spec, "rollout")
    assert rollout["minReplicas"] < rollout["maxReplicas"]
    pod = rollout["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    _group(spec, "learner")
    env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "score-rl-s3"
    assert env["AWS_ENDPOINT_URL_S3"]["valueFrom"]["secretKeyRef"]["optional"] is True
    cfg = load_config(ROOT / "configs" / f"cluster-{variant}.yaml")
    assert cfg.run.storage.startswith("s3://") and cfg.mllm.path.startswith("s3://")
    assert cfg.rollout.num_gpus == 1 and cfg.mllm.dtype == "bfloat16"
    assert cfg.rollout.min_actors < cfg.rollout.max_actors


def test_dockerfile_matches_the_manifests(manifests):
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    ray_pin = re.search(r"RAY_VERSION=([0-9.]+)", text).group(1)
    for ms in manifests.values():
        assert _one(ms, "RayCluster").obj["spec"]["rayVersion"] == ray_pin
    assert re.search(r"^RUN pip install \. ", text, re.M), "the image installs the project with `pip install .`"
    assert "torch==${TORCH_VERSION}" in text and "download.pytorch.org/whl/cpu" not in text  # CUDA torch
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torchvision" not in code and "timm" not in code
    assert re.search(r"^WORKDIR /app$", text, re.M)
    head = _one(manifests["small"], "RayCluster").obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["workingDir"] == "/app"


def test_readme_walks_through_the_deployment():
    text = (ROOT / "cluster" / "README.md").read_text()
    for needle in ("helm install kuberay-operator", "kubectl apply -f cluster/small/rayjob.yaml",
                   "ray job submit --address", "--working-dir .", "jobs/train_curriculum.py",
                   "ActorPoolStrategy", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                   "port-forward svc/score-rl-tensorboard", "docker build -f cluster/Dockerfile"):
        assert needle in text, needle
    for path in re.findall(r"\b((?:cluster|configs|jobs)/[\w./-]+\.(?:yaml|py))\b", text):
        assert (ROOT / path).exists() or "<" in path, f"README names a missing file {path}"


# ------------------------------------------------------------------------------ planted errors


def _rayjob_cluster(ms: list[k8s.Manifest]) -> dict:
    return _one(ms, "RayJob").obj["spec"]["rayClusterSpec"]


def _both_cluster_specs(ms: list[k8s.Manifest]) -> list[dict]:
    """The same edit on the standalone RayCluster and the RayJob's rayClusterSpec (so that only
    the planted problem is reported, not the drift between them)."""
    return [_one(ms, "RayCluster").obj["spec"], _rayjob_cluster(ms)]


def _unknown_field(ms):
    _one(ms, "RayCluster").obj["spec"]["enableInTreeAutoscalling"] = True


def _unknown_field_in_pod(ms):
    _group(_one(ms, "RayCluster").obj["spec"], "rollout")["template"]["spec"]["containers"][0]["gpuCount"] = 1


def _wrong_type(ms):
    _group(_one(ms, "RayCluster").obj["spec"], "rollout")["minReplicas"] = "two"


def _ray_start_param_not_string(ms):
    _one(ms, "RayJob").obj["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _bad_enum(ms):
    _one(ms, "RayJob").obj["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"


def _rayjob_unknown_field(ms):
    _one(ms, "RayJob").obj["spec"]["shutdownAfterJobFinish"] = True


def _gpu_limit_below_actor(ms):
    for spec in _both_cluster_specs(ms):
        _group(spec, "rollout")["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "0"


def _cpu_below_actor(ms):
    for spec in _both_cluster_specs(ms):
        res = _group(spec, "rollout")["template"]["spec"]["containers"][0]["resources"]
        res["limits"]["cpu"] = res["requests"]["cpu"] = "2"


def _max_replicas_below_pool(ms):
    for spec in _both_cluster_specs(ms):
        _group(spec, "rollout")["maxReplicas"] = 1


def _missing_script(ms):
    job = _one(ms, "RayJob").obj["spec"]
    job["entrypoint"] = job["entrypoint"].replace("jobs/train_curriculum.py", "jobs/train_curriculum_v2.py")


def _missing_config(ms):
    job = _one(ms, "RayJob").obj["spec"]
    job["entrypoint"] = job["entrypoint"].replace("configs/cluster-small.yaml", "configs/cluster-huge.yaml")


def _mismatched_image(ms):
    for spec in _both_cluster_specs(ms):
        _group(spec, "rollout")["template"]["spec"]["containers"][0]["image"] = "registry.example.com/score-rl:0.0.9"


def _mismatched_submitter_image(ms):
    _one(ms, "RayJob").obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0"


def _head_runs_work(ms):
    for spec in _both_cluster_specs(ms):
        del spec["headGroupSpec"]["rayStartParams"]["num-cpus"]


def _no_s3_secret(ms):
    for spec in _both_cluster_specs(ms):
        c = _group(spec, "learner")["template"]["spec"]["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]


def _no_gpu_toleration(ms):
    for spec in _both_cluster_specs(ms):
        del _group(spec, "rollout")["template"]["spec"]["tolerations"]


def _drift(ms):
    _group(_rayjob_cluster(ms), "rollout")["maxReplicas"] += 1


def _undefined_secret(ms):
    for m in ms:
        if m.kind == "Secret" and m.name == "score-rl-s3":
            m.obj["metadata"]["name"] = "score-rl-s3-creds"


def _deployment_unknown_field(ms):
    d = _one(ms, "Deployment").obj
    d["spec"]["template"]["spec"]["containers"][0]["port"] = 6006


def _service_wrong_type(ms):
    _one(ms, "Service").obj["spec"]["ports"][0]["port"] = "six-thousand"


PLANTED = {
    # name: (mutation, needs kubernetes-validate, substrings the problem must contain)
    "unknown field in RayCluster spec": (_unknown_field, False, ["RayCluster/", "spec", "unknown field 'enableInTreeAutoscalling'"]),
    "unknown field in a pod template": (_unknown_field_in_pod, False, ["containers[0]", "unknown field 'gpuCount'"]),
    "minReplicas is a string": (_wrong_type, False, ["workerGroupSpecs[1].minReplicas", "'two'", "integer"]),
    "rayStartParams value not a string": (_ray_start_param_not_string, False, ["rayStartParams.num-cpus", "string"]),
    "upscalingMode not in the enum": (_bad_enum, False, ["upscalingMode", "'Fast'"]),
    "unknown field in RayJob spec": (_rayjob_unknown_field, False, ["RayJob/", "unknown field 'shutdownAfterJobFinish'"]),
    "pod GPU limit below rollout.num_gpus": (_gpu_limit_below_actor, False, ["rollout.num_gpus=1", "nvidia.com/gpu limit (0)"]),
    "pod CPUs below rollout.num_cpus": (_cpu_below_actor, False, ["rollout.num_cpus=", "exceeds the pod's CPUs (2)"]),
    "maxReplicas below rollout.max_actors": (_max_replicas_below_pool, False, ["maxReplicas=1", "rollout.max_actors="]),
    "missing entrypoint script": (_missing_script, False, ["entrypoint script jobs/train_curriculum_v2.py does not exist"]),
    "missing config file": (_missing_config, False, ["configs/cluster-huge.yaml does not exist"]),
    "mismatched worker image": (_mismatched_image, False, ["image mismatch", "workerGroupSpecs[rollout]", "0.0.9"]),
    "mismatched submitter image": (_mismatched_submitter_image, False, ["image mismatch", "submitterPodTemplate", "rayproject/ray"]),
    "head without num-cpus 0": (_head_runs_work, False, ['num-cpus: "0"', "head"]),
    "S3 key not from a Secret": (_no_s3_secret, False, ["workerGroupSpecs[learner]", "AWS_SECRET_ACCESS_KEY", "Secret"]),
    "GPU pods without toleration": (_no_gpu_toleration, False, ["workerGroupSpecs[rollout]", "toleration", "nvidia.com/gpu"]),
    "RayJob cluster drifts from RayCluster": (_drift, False, ["rayClusterSpec differs"]),
    "Secret referenced but not defined": (_undefined_secret, False, ["Secret 'score-rl-s3'", "no manifest defines"]),
    "unknown field in Deployment": (_deployment_unknown_field, True, ["Deployment/", "unknown field 'port'"]),
    "Service port not an integer": (_service_wrong_type, True, ["Service/", "ports[0].port", "'six-thousand'"]),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_error_is_rejected(manifests, name):
    mutate, core, needles = PLANTED[name]
    if core and not _has_core_validator():
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    ms = [k8s.Manifest(k8s.clone(m.obj), m.source, m.index) for m in manifests["small"]]
    with_core = _has_core_validator()
    assert k8s.validate_manifests(ms, core=with_core) == [], "the unmodified copy must be valid"
    mutate(ms)
    problems = k8s.validate_manifests(ms, core=with_core)
    assert problems, f"planted error not detected: {name}"
    assert any(all(n in p for n in needles) for p in problems), (
        f"no problem names {needles}; got:\n" + "\n".join(problems))


def test_config_asking_more_than_the_pod_is_rejected(manifests, tmp_path):
    """The config side of the resource check: rollout.num_gpus=2 on 1-GPU rollout pods."""
    (tmp_path / "jobs").mkdir()
    shutil.copy(ROOT / "jobs" / "train_curriculum.py", tmp_path / "jobs")
    cfg = yaml.safe_load((ROOT / "configs" / "cluster-small.yaml").read_text())
    cfg["rollout"]["num_gpus"] = 2
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cluster-small.yaml").write_text(yaml.safe_dump(cfg))
    ms = [k8s.Manifest(k8s.clone(m.obj), m.source, m.index) for m in manifests["small"]]
    problems = k8s.check_consistency(ms, repo_root=tmp_path)
    assert any("rollout.num_gpus=2 exceeds the pod's nvidia.com/gpu limit (1)" in p for p in problems), problems


def test_invalid_config_is_reported(manifests, tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train_curriculum.py").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cluster-small.yaml").write_text("rollout:\n  min_actors: 3\n  max_actors: 2\n")
    ms = [k8s.Manifest(k8s.clone(m.obj), m.source, m.index) for m in manifests["small"]]
    problems = k8s.check_consistency(ms, repo_root=tmp_path)
    assert any("configs/cluster-small.yaml" in p and "max_actors must be >= min_actors" in p for p in problems), problems


def test_cli_fails_on_a_broken_file(tmp_path, capsys):
    bad = tmp_path / "rc.yaml"
    doc = yaml.safe_load((ROOT / "cluster" / "small" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "eight"
    bad.write_text(yaml.safe_dump(doc))
    assert k8s.main([str(bad)]) == 1
    assert "maxReplicas: 'eight' is not of type 'integer'" in capsys.readouterr().out
