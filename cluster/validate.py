"""Offline validation of the Kubernetes manifests under ``cluster/`` (no API server needed).

Three layers, each returning a list of one-line problems (empty = valid):

* :func:`validate_custom` - a ``RayCluster`` / ``RayJob`` against the KubeRay CRD schema
  (``cluster/crds/``), strictly: the CRD's ``openAPIV3Schema`` is turned into a JSON Schema by
  :func:`crd_to_json_schema` (``x-kubernetes-int-or-string`` -> integer or string, ``nullable`` ->
  null allowed, ``additionalProperties: false`` on every object unless
  ``x-kubernetes-preserve-unknown-fields``), so an unknown or misspelt field is an error, as it
  is for ``kubectl apply --validate=strict``. Not covered: CEL rules (``x-kubernetes-validations``)
  and defaulting.
* :func:`validate_core` - core kinds (Secret, Deployment, Service, PVC...) with
  ``kubernetes-validate`` in strict mode (its Python API, :data:`K8S_VERSION` schemas).
* :func:`check_consistency` - what no schema knows: the RayJob's entrypoint script and its
  ``--config`` exist in the repo and the config validates (:func:`pipeline.config.load_config`);
  the config's per-actor resources fit the pods of the rollout / learner worker groups and their
  ``minReplicas``/``maxReplicas`` hold the pool's ``min_actors``/``max_actors``; the head runs no
  work (``num-cpus: "0"``); one image across head, workers and submitter; S3 credentials from a
  Secret when the run's storage is ``s3://``; referenced Secrets / PVCs are defined; a RayJob's
  ``rayClusterSpec`` equals the standalone RayCluster's ``spec`` in the same directory.

:func:`validate_paths` runs all three over files/directories; :func:`variant_paths` names one
variant (``small``/``large``: ``cluster/<variant>/*.yaml`` plus the shared ``cluster/*.yaml``).
CLI: ``python cluster/validate.py [small large | PATH...]`` prints the problems, exit 1 if any.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "cluster"
CRD_DIR = CLUSTER_DIR / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CUSTOM_GROUP = "ray.io"
K8S_VERSION = "1.32"  # core-kind schemas used by kubernetes-validate
GPU_KEY = "nvidia.com/gpu"
ROLLOUT_GROUP = "rollout"  # worker groups are found by these names (substring of groupName)
LEARNER_GROUP = "learner"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CoreValidatorMissing(RuntimeError):
    """``kubernetes-validate`` is not installed (``pip install kubernetes-validate``)."""


@dataclass
class Manifest:
    obj: dict[str, Any]
    source: Path
    index: int = 0

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", "?"))

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name", "?"))

    @property
    def label(self) -> str:
        try:
            src = self.source.resolve().relative_to(REPO_ROOT)
        except ValueError:
            src = self.source
        return f"{src}: {self.kind}/{self.name}"


# ---------------------------------------------------------------------------------------------
# Loading


def load_manifests(paths: Iterable[str | Path]) -> list[Manifest]:
    """Every YAML document of the given files, and of the ``*.yaml``/``*.yml`` files directly in
    the given directories (sorted; empty documents skipped)."""
    out: list[Manifest] = []
    for p in paths:
        p = Path(p)
        files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
        for f in files:
            for i, doc in enumerate(yaml.load_all(f.read_text(), Loader=_Loader)):
                if doc is not None:
                    out.append(Manifest(clone(doc), f, i))
    return out


def clone(obj: Any) -> Any:
    """A deep copy that shares nothing: YAML aliases (``*ray-env``) load as ONE object used in
    several places, and ``copy.deepcopy`` would keep that sharing, so an edit of one pod
    template's env would silently change every pod's."""
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone(v) for v in obj]
    return obj


def variant_paths(variant: str, cluster_dir: Path = CLUSTER_DIR) -> list[Path]:
    """The manifests of one variant: ``cluster/<variant>/`` plus the shared ``cluster/*.yaml``."""
    d = cluster_dir / variant
    if not d.is_dir():
        raise FileNotFoundError(f"no manifest variant {variant!r} (no directory {d})")
    return [*sorted(cluster_dir.glob("*.yaml")), d]


# ---------------------------------------------------------------------------------------------
# CRD -> JSON Schema

_PASS = ("type", "required", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
         "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "multipleOf")

# metadata of a top-level object: the CRD says only `type: object`; the API server checks it as
# ObjectMeta. Names follow DNS-1123 (subdomain for the name, label for the namespace).
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        **{k: {} for k in ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                           "deletionGracePeriodSeconds", "managedFields", "selfLink")},
    },
    "additionalProperties": False,
}


def _with_null(schema: dict[str, Any]) -> dict[str, Any]:
    t = schema.get("type")
    if t is None:
        return schema
    types = list(t) if isinstance(t, list) else [t]
    if "null" not in types:
        types.append("null")
    schema["type"] = types
    if "enum" in schema and None not in schema["enum"]:
        schema["enum"] = [*schema["enum"], None]
    return schema


def crd_to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """One CRD ``openAPIV3Schema`` node -> a JSON Schema (draft 2020-12) node, strict."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {name: crd_to_json_schema(sub) for name, sub in v.items()}
        elif k == "items":
            out[k] = crd_to_json_schema(v) if isinstance(v, dict) else [crd_to_json_schema(s) for s in v]
        elif k in ("anyOf", "oneOf", "allOf"):
            out[k] = [crd_to_json_schema(s) for s in v]
        elif k == "not":
            out[k] = crd_to_json_schema(v)
        elif k == "additionalProperties":
            out[k] = crd_to_json_schema(v) if isinstance(v, dict) else bool(v)
        elif k in ("exclusiveMinimum", "exclusiveMaximum"):  # OpenAPI 3.0: a flag on minimum/maximum
            bound = "minimum" if k == "exclusiveMinimum" else "maximum"
            if isinstance(v, bool):
                if v and bound in node:
                    out[k] = node[bound]
            else:
                out[k] = v
        elif k in _PASS:
            out[k] = copy.deepcopy(v)
        # dropped: description, default, format, example, x-kubernetes-* (CEL rules, list/map types)
    for bound in ("minimum", "maximum"):
        flag = "exclusiveMinimum" if bound == "minimum" else "exclusiveMaximum"
        if node.get(flag) is True and bound in out:
            del out[bound]
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        if all(set(s) == {"type"} for s in out.get("anyOf", [])):
            out.pop("anyOf", None)  # the CRD's spelled-out `anyOf: [integer, string]`
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})  # ObjectMeta, left open
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if is_object and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        _with_null(out)
    return out


@lru_cache(maxsize=None)
def _crd(kind: str, crd_dir: str) -> dict[str, Any]:
    path = Path(crd_dir) / CRD_FILES[kind]
    return yaml.load(path.read_text(), Loader=_Loader)


@lru_cache(maxsize=None)
def _custom_validator(kind: str, version: str, crd_dir: str) -> Any:
    import jsonschema

    crd = _crd(kind, crd_dir)
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served", True):
            schema = crd_to_json_schema(v["schema"]["openAPIV3Schema"])
            break
    else:
        served = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
        raise KeyError(f"{kind}: the CRD does not serve version {version!r} (served: {served})")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": f"{CUSTOM_GROUP}/{version}"}
    props["kind"] = {"const": kind}
    props["metadata"] = OBJECT_META_SCHEMA
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _json_path(path: Iterable[Any]) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "<root>"


def _describe(err: Any) -> str:
    where = _json_path(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set((err.schema.get("properties") or {}).keys())
        extra = sorted(k for k in err.instance if k not in allowed)
        if extra:
            return f"{where}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}"
    if err.validator == "anyOf" and all(set(s) == {"type"} for s in err.validator_value):
        types = " or ".join(str(s["type"]) for s in err.validator_value)
        return f"{where}: {err.instance!r} is not of type {types}"
    return f"{where}: {err.message}"


def validate_custom(obj: dict[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """A ``RayCluster``/``RayJob`` against the KubeRay CRD, strictly. One line per problem."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of the KubeRay kinds {sorted(CRD_FILES)}"]
    api = str(obj.get("apiVersion", ""))
    group, _, version = api.rpartition("/")
    if group != CUSTOM_GROUP:
        return [f"apiVersion {api!r}: expected {CUSTOM_GROUP}/<version>"]
    try:
        validator = _custom_validator(kind, version, str(crd_dir))
    except KeyError as e:
        return [str(e.args[0])]
    errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    seen: list[str] = []
    for e in errors:
        msg = _describe(e)
        if msg not in seen:
            seen.append(msg)
    return seen


# ---------------------------------------------------------------------------------------------
# Core kinds (kubernetes-validate)


def validate_core(obj: dict[str, Any], version: str = K8S_VERSION) -> list[str]:
    """A core/built-in kind with ``kubernetes-validate`` in strict mode (unknown fields rejected).
    Raises :class:`CoreValidatorMissing` if the package is not installed."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError as e:  # pragma: no cover - exercised only without the test extra
        raise CoreValidatorMissing(f"kubernetes-validate is not installed ({e}); pip install kubernetes-validate") from None
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_json_path(e.absolute_path)}: {_describe_core(e)}"]
    except SchemaNotFoundError as e:
        return [e.message]
    return []


def _describe_core(err: Any) -> str:
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set((err.schema.get("properties") or {}).keys())
        extra = sorted(k for k in err.instance if k not in allowed)
        if extra:
            return f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}"
    return err.message


def validate_manifest(obj: dict[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """Schema check of one document: KubeRay kinds against the CRDs, the rest as core kinds."""
    if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
        return ["not a Kubernetes object (needs apiVersion and kind)"]
    if str(obj["apiVersion"]).startswith(CUSTOM_GROUP + "/"):
        return validate_custom(obj, crd_dir)
    return validate_core(obj)


# ---------------------------------------------------------------------------------------------
# Consistency

_QTY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": 1e-9, "u": 1e-6}


def quantity(q: Any) -> float:
    """A Kubernetes quantity (``"7500m"``, ``8``, ``"16Gi"``) as a number."""
    if isinstance(q, bool):
        raise ValueError(f"not a quantity: {q!r}")
    if isinstance(q, (int, float)):
        return float(q)
    m = _QTY.match(str(q).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


@dataclass
class PodShape:
    """What one Ray pod of a group offers to Ray: logical CPUs/GPUs (as KubeRay derives them:
    ``rayStartParams`` first, else the Ray container's limits, else its requests)."""

    cpus: float
    gpus: float


def pod_shape(group: dict[str, Any]) -> PodShape:
    params = group.get("rayStartParams") or {}
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers") or [{}])
    res = containers[0].get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}

    def pick(param: str, key: str) -> float:
        if param in params:
            return quantity(params[param])
        if key in limits:
            return quantity(limits[key])
        if key in requests:
            return quantity(requests[key])
        return 0.0

    return PodShape(cpus=pick("num-cpus", "cpu"), gpus=pick("num-gpus", GPU_KEY))


def _per_pod(shape: PodShape, cpus: float, gpus: float) -> int:
    """How many units of ``cpus`` CPU + ``gpus`` GPU one pod holds."""
    n = math.floor(shape.cpus / cpus + 1e-9) if cpus > 0 else 10**9
    if gpus > 0:
        n = min(n, math.floor(shape.gpus / gpus + 1e-9))
    return n


def _group(spec: dict[str, Any], needle: str) -> dict[str, Any] | None:
    for g in spec.get("workerGroupSpecs") or []:
        if needle in str(g.get("groupName", "")):
            return g
    return None


def _pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [("head", ((spec.get("headGroupSpec") or {}).get("template") or {}))]
    for g in spec.get("workerGroupSpecs") or []:
        out.append((f"workerGroupSpecs[{g.get('groupName', '?')}]", g.get("template") or {}))
    return out


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return ((template.get("spec") or {}).get("containers") or [{}])[0]


def _env_from_secret(container: dict[str, Any], var: str) -> str | None:
    """Name of the Secret that ``var`` comes from (``valueFrom.secretKeyRef`` or ``envFrom``)."""
    for e in container.get("env") or []:
        if e.get("name") == var:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            return ref.get("name") if ref else None
    for ef in container.get("envFrom") or []:
        if "secretRef" in ef:
            return ef["secretRef"].get("name")
    return None


def check_cluster_spec(spec: dict[str, Any], cfg: Any, where: str) -> list[str]:
    """The RayCluster spec that will run ``cfg`` (a :class:`pipeline.config.Config`)."""
    probs: list[str] = []
    head = spec.get("headGroupSpec") or {}
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        probs.append(f'{where}: headGroupSpec.rayStartParams must set num-cpus: "0" (the head runs no training work)')

    r, lc = cfg.rollout, cfg.learner
    rollout = _group(spec, ROLLOUT_GROUP)
    if rollout is None:
        probs.append(f"{where}: no worker group named *{ROLLOUT_GROUP}* for the rollout actor pool")
    else:
        name = f"{where}: workerGroupSpecs[{rollout.get('groupName')}]"
        try:
            shape = pod_shape(rollout)
        except ValueError as e:
            return [*probs, f"{name}: {e}"]
        if r.num_gpus > shape.gpus + 1e-9:
            probs.append(f"{name}: rollout.num_gpus={r.num_gpus:g} exceeds the pod's {GPU_KEY} limit ({shape.gpus:g})")
        if r.num_cpus > shape.cpus + 1e-9:
            probs.append(f"{name}: rollout.num_cpus={r.num_cpus:g} exceeds the pod's CPUs ({shape.cpus:g})")
        per = _per_pod(shape, r.num_cpus, r.num_gpus)
        lo, hi = int(rollout.get("minReplicas", 0) or 0), int(rollout.get("maxReplicas", 0) or 0)
        if per >= 1:
            if lo * per < r.min_actors:
                probs.append(f"{name}: minReplicas={lo} x {per} actor(s)/pod < rollout.min_actors={r.min_actors}"
                             " (the stage needs the minimum pool at start)")
            if hi * per < r.max_actors:
                probs.append(f"{name}: maxReplicas={hi} x {per} actor(s)/pod < rollout.max_actors={r.max_actors}"
                             " (the pool could never reach its maximum)")
        if r.max_actors > r.min_actors and hi > lo and not spec.get("enableInTreeAutoscaling"):
            probs.append(f"{where}: rollout.min_actors < max_actors but enableInTreeAutoscaling is not true:"
                         " the pool could not grow past minReplicas pods")

    learner = _group(spec, LEARNER_GROUP)
    if learner is None:
        probs.append(f"{where}: no worker group named *{LEARNER_GROUP}* for the Ray Train learner")
    else:
        name = f"{where}: workerGroupSpecs[{learner.get('groupName')}]"
        try:
            shape = pod_shape(learner)
        except ValueError as e:
            return [*probs, f"{name}: {e}"]
        gpus = 1.0 if lc.use_gpu else 0.0
        if lc.cpus_per_worker > shape.cpus + 1e-9:
            probs.append(f"{name}: learner.cpus_per_worker={lc.cpus_per_worker:g} exceeds the pod's CPUs ({shape.cpus:g})")
        if gpus > shape.gpus + 1e-9:
            probs.append(f"{name}: learner.use_gpu=true needs 1 GPU per worker but the pod's {GPU_KEY} limit is {shape.gpus:g}")
        per = _per_pod(shape, lc.cpus_per_worker, gpus)
        lo = int(learner.get("minReplicas", 0) or 0)
        if rollout is not None and _per_pod(shape, r.num_cpus, r.num_gpus) >= 1:
            probs.append(f"{name}: a rollout actor ({r.num_cpus:g} CPU + {r.num_gpus:g} GPU) also fits a learner pod"
                         f" ({shape.cpus:g} CPU + {shape.gpus:g} GPU): Ray could place it there and starve the learner")
        if per >= 1 and lo * per < lc.num_workers:
            probs.append(f"{name}: minReplicas={lo} x {per} worker(s)/pod < learner.num_workers={lc.num_workers}")

    for label, tpl in _pod_templates(spec):
        tspec = tpl.get("spec") or {}
        gpu_limit = ((_ray_container(tpl).get("resources") or {}).get("limits") or {}).get(GPU_KEY)
        if gpu_limit and not any(t.get("key") == GPU_KEY for t in tspec.get("tolerations") or []):
            probs.append(f"{where}: {label}: GPU pods need a toleration for the {GPU_KEY} taint")
    if str(cfg.run.storage).startswith("s3://"):
        for label, tpl in _pod_templates(spec):
            c = _ray_container(tpl)
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if _env_from_secret(c, var) is None:
                    probs.append(f"{where}: {label}: run.storage is on S3 but {var} does not come from a Secret"
                                 " (env valueFrom.secretKeyRef)")
    return probs


def _entrypoint(rayjob: Manifest) -> tuple[str | None, str | None, list[str]]:
    """``(script, config, problems)`` parsed from ``spec.entrypoint``."""
    ep = str((rayjob.obj.get("spec") or {}).get("entrypoint") or "")
    try:
        argv = shlex.split(ep)
    except ValueError as e:
        return None, None, [f"{rayjob.label}: entrypoint is not a valid shell command ({e})"]
    script = next((a for i, a in enumerate(argv) if a.endswith(".py") and i > 0
                   and Path(argv[i - 1]).name.startswith("python")), None)
    if script is None:
        return None, None, [f"{rayjob.label}: entrypoint {ep!r} does not run `python <script>.py`"]
    config = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
    return script, config, []


def _in_repo(path: str, spec: dict[str, Any], repo_root: Path) -> Path:
    """A path of the entrypoint (relative to the Ray container's workingDir = the repo in the
    image) as a path in this checkout."""
    p = Path(path)
    if p.is_absolute():
        wd = _ray_container((spec.get("headGroupSpec") or {}).get("template") or {}).get("workingDir")
        if wd and str(p).startswith(wd.rstrip("/") + "/"):
            return repo_root / p.relative_to(wd)
        return p
    return repo_root / p


def _images(m: Manifest) -> list[tuple[str, str]]:
    spec = m.obj.get("spec") or {}
    cluster = spec.get("rayClusterSpec") if m.kind == "RayJob" else spec
    out = [(label, _ray_container(tpl).get("image")) for label, tpl in _pod_templates(cluster or {})]
    if m.kind == "RayJob" and spec.get("submitterPodTemplate"):
        out.append(("submitterPodTemplate", _ray_container(spec["submitterPodTemplate"]).get("image")))
    return [(f"{m.label}: {label}", img) for label, img in out]


def _referenced(obj: Any, key: str, field: str = "name") -> set[str]:
    """Values of ``field`` in every ``key`` mapping anywhere in ``obj`` (e.g. the names of all
    ``secretKeyRef``s, the ``claimName`` of all ``persistentVolumeClaim`` volumes)."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, dict) and v.get(field):
                found.add(str(v[field]))
            found |= _referenced(v, key, field)
    elif isinstance(obj, list):
        for v in obj:
            found |= _referenced(v, key, field)
    return found


def check_consistency(manifests: list[Manifest], repo_root: Path = REPO_ROOT) -> list[str]:
    """Cross-checks of a set of manifests against each other and the repo (see module doc)."""
    from pipeline.config import ConfigError, load_config

    probs: list[str] = []
    clusters = [m for m in manifests if m.kind == "RayCluster"]
    jobs = [m for m in manifests if m.kind == "RayJob"]

    for job in jobs:
        spec = job.obj.get("spec") or {}
        cluster_spec = spec.get("rayClusterSpec")
        if cluster_spec is None:
            probs.append(f"{job.label}: no rayClusterSpec (this RayJob must bring up its own cluster)")
            continue
        script, config, p = _entrypoint(job)
        probs += p
        if script is not None and not _in_repo(script, cluster_spec, repo_root).is_file():
            probs.append(f"{job.label}: entrypoint script {script} does not exist in the repo")
        cfg = None
        if script is not None and config is None:
            probs.append(f"{job.label}: entrypoint has no --config <file>")
        elif config is not None:
            cfg_path = _in_repo(config, cluster_spec, repo_root)
            if not cfg_path.is_file():
                probs.append(f"{job.label}: entrypoint config {config} does not exist in the repo")
            else:
                try:
                    cfg = load_config(cfg_path)
                except ConfigError as e:
                    probs.append(f"{job.label}: {config}: {e}")
        if cfg is not None:
            probs += check_cluster_spec(cluster_spec, cfg, job.label)
        # the standalone RayCluster next to this RayJob (the `ray job submit` route) must match
        for c in clusters:
            if c.source.parent == job.source.parent and c.obj.get("spec") != cluster_spec:
                probs.append(f"{job.label}: spec.rayClusterSpec differs from {c.label} spec"
                             " (keep the two in sync)")
    for c in clusters:
        spec = c.obj.get("spec") or {}
        if str(((spec.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("num-cpus")) != "0":
            msg = f'{c.label}: headGroupSpec.rayStartParams must set num-cpus: "0" (the head runs no training work)'
            if msg not in probs:
                probs.append(msg)

    images = [x for m in [*clusters, *jobs] for x in _images(m)]
    distinct = sorted({img for _, img in images if img})
    if len(distinct) > 1:
        first = images[0][1]
        odd = [f"{where} uses {img!r}" for where, img in images if img != first]
        probs.append(f"image mismatch: {images[0][0]} uses {first!r} but " + "; ".join(odd))
    for where, img in images:
        if not img:
            probs.append(f"{where}: container has no image")

    secrets = {m.name for m in manifests if m.kind == "Secret"}
    claims = {m.name for m in manifests if m.kind == "PersistentVolumeClaim"}
    for m in manifests:
        for s in sorted(_referenced(m.obj, "secretKeyRef") | _referenced(m.obj, "secretRef")):
            if s not in secrets:
                probs.append(f"{m.label}: references Secret {s!r}, which no manifest defines")
        for pvc in sorted(_referenced(m.obj, "persistentVolumeClaim", "claimName")):
            if pvc not in claims:
                probs.append(f"{m.label}: references PersistentVolumeClaim {pvc!r}, which no manifest defines")
        auth = ((m.obj.get("spec") or {}).get("rayClusterSpec") if m.kind == "RayJob" else m.obj.get("spec") or {})
        secret_name = ((auth or {}).get("authOptions") or {}).get("secretName")
        if secret_name and secret_name not in secrets:
            probs.append(f"{m.label}: authOptions.secretName {secret_name!r} is not defined by any manifest")
    return probs


# ---------------------------------------------------------------------------------------------
# All together


def validate_manifests(manifests: list[Manifest], repo_root: Path = REPO_ROOT, crd_dir: Path = CRD_DIR,
                       core: bool = True) -> list[str]:
    """Schema problems of every manifest, then the consistency problems of the set.
    ``core=False`` leaves out the core kinds (when kubernetes-validate is not installed)."""
    probs: list[str] = []
    for m in manifests:
        if not core and not str(m.obj.get("apiVersion", "")).startswith(CUSTOM_GROUP + "/"):
            continue
        probs += [f"{m.label}: {p}" for p in validate_manifest(m.obj, crd_dir)]
    return probs + check_consistency(manifests, repo_root)


def validate_paths(paths: Iterable[str | Path], repo_root: Path = REPO_ROOT, crd_dir: Path = CRD_DIR,
                   core: bool = True) -> list[str]:
    """Schema + consistency problems of the manifests under ``paths`` (empty list = valid)."""
    return validate_manifests(load_manifests(paths), repo_root, crd_dir, core)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        args = sorted(p.name for p in CLUSTER_DIR.iterdir() if p.is_dir() and p.name != "crds")
    status = 0
    for a in args:
        paths = variant_paths(a) if (CLUSTER_DIR / a).is_dir() and not Path(a).exists() else [Path(a)]
        probs = validate_paths(paths)
        print(f"{a}: {'OK' if not probs else f'{len(probs)} problem(s)'}")
        for p in probs:
            print(f"  - {p}")
        status |= bool(probs)
    return status


if __name__ == "__main__":
    sys.exit(main())
