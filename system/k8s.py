"""KubeRay manifests rendered from a recipe's own config: `mnemo k8s render|examples`.

    mnemo k8s render RECIPE --preset full --image IMG --workers N [--out DIR] [--set k=v ...]
    mnemo k8s examples [--check]      re-render (or compare) the examples committed under k8s/

Why render instead of hand-written YAML: the RayJob's entrypoint is the recipe's command line,
parsed and resolved here exactly as the job will parse it, and the cluster's shape (worker
pods, GPUs, CPUs, memory) is derived from that resolved config. A manifest therefore cannot ask
for a cluster its job does not fit, and a bad flag fails here, not after the pods are up.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from system import config as C

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "k8s"

RAY_VERSION = "2.60.0"  # the image pins the same (k8s/Dockerfile ARG RAY_VERSION)
UID = GID = 1000  # the image's non-root user (k8s/Dockerfile ARG MNEMO_UID)
APP_DIR = "/app"  # the image's WORKDIR: the code the job runs, uploaded as its working_dir
MOUNT = "/mnt/mnemo"  # the shared ReadWriteMany volume: run dirs (and data) live here
PVC = "mnemo-runs"
AUTH_SECRET = "mnemo-ray-auth"  # created by hand (k8s/README.md); never rendered or committed
EXAMPLE_IMAGE = "registry.example.com/mnemosyne:0.1.0"
# The committed examples; every recipe in launch/ gets both. `sets` adapt a preset to the
# example's world size where its batch geometry needs it (checked by trainer.accum_steps).
EXAMPLES = {
    "cpu-smoke": {"profile": "cpu", "preset": "smoke", "workers": None},
    "h100x8": {"profile": "h100x8", "preset": "full", "workers": 64},
}
EXAMPLE_SETS: dict[tuple[str, str], list[str]] = {
    ("transformer_lm", "h100x8"): ["train.micro_batch=2"],
    # One 2M-token sequence per GPU on all 64 GPUs.
    ("titans_2m", "h100x8"): [f"train.batch_tokens={64 * 2_097_152}"],
}
LABELS = {"app.kubernetes.io/name": "mnemosyne", "app.kubernetes.io/part-of": "mnemosyne"}
# Left out of the job's working_dir upload (Ray also honours .gitignore where there is one).
EXCLUDES = [
    ".git/",
    ".venv/",
    "runs/",
    "**/__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "k8s/crds/",  # 2.3 MB of vendored CRD schemas: tests and cluster set-up, not the job
]
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # see system/launcher.py _RAY_ENV


@dataclass(frozen=True)
class Profile:
    """One kind of worker node. GPU pods take a whole node; CPU pods hold one Ray worker."""

    name: str
    gpus_per_pod: int
    cpu_overhead: int  # CPUs per pod beyond the Ray Train workers (raylet, data loading)
    mem_per_worker_gi: int
    mem_overhead_gi: int
    shm_gi: int  # /dev/shm (Ray's object store, NCCL); counts against the memory limit
    head_cpu: int
    head_mem_gi: int
    deadline_s: int  # RayJob activeDeadlineSeconds
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


PROFILES = {
    "cpu": Profile(
        name="cpu", gpus_per_pod=0, cpu_overhead=1, mem_per_worker_gi=3, mem_overhead_gi=2,
        shm_gi=1, head_cpu=2, head_mem_gi=8, deadline_s=3600,
    ),
    "h100x8": Profile(
        name="h100x8", gpus_per_pod=8, cpu_overhead=8, mem_per_worker_gi=160, mem_overhead_gi=64,
        shm_gi=256, head_cpu=16, head_mem_gi=64, deadline_s=14 * 86400,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env={
            "NCCL_DEBUG": "WARN",
            "NCCL_SOCKET_IFNAME": "eth0",  # the pod network for bootstrap / TCP fallback
            "NCCL_IB_DISABLE": "0",
            "NCCL_IB_HCA": "mlx5",  # InfiniBand / RoCE HCAs by prefix
        },
    ),
}  # fmt: skip


@dataclass
class Rendered:
    """What one render produced: the resolved config and the documents, by file name."""

    cfg: C.JobConfig
    entrypoint: list[str]
    files: dict[str, str]


def load_recipe(recipe: str) -> None:
    """Import launch/<recipe>.py so its presets register (the file's main() does not run)."""
    path = ROOT / "launch" / f"{recipe}.py"
    if not re.fullmatch(r"[a-z0-9_]+", recipe) or not path.exists():
        known = ", ".join(recipes()) or "none"
        raise ValueError(f"no recipe {recipe!r} (expected launch/{recipe}.py); known: {known}")
    spec = importlib.util.spec_from_file_location(f"_mnemo_recipe_{recipe}", path)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def recipes() -> list[str]:
    return sorted(p.stem for p in (ROOT / "launch").glob("*.py") if not p.stem.startswith("_"))


def dns_name(text: str) -> str:
    """A Kubernetes object name (RFC 1123 label) for `text`."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    # KubeRay appends suffixes for the cluster, its pods and services: stay well under 63.
    if not name or len(name) > 40:
        raise ValueError(f"name {name!r} must be 1-40 characters of a-z, 0-9 and '-'")
    return name


def resolve_job(
    recipe: str, preset: str, workers: int, sets: list[str], run_dir: str
) -> tuple[C.JobConfig, list[str]]:
    """The entrypoint and the config the job will resolve from it (the same code path)."""
    from system.cli import recipe_parser, resolve

    load_recipe(recipe)
    flags = ["--preset", preset, "--run-dir", run_dir, "--resume", "auto", "--address", "auto"]
    flags += ["--workers", str(workers)]
    for s in sets:
        flags += ["--set", s]
    cfg = resolve(recipe, recipe_parser(recipe).parse_args(flags))
    return cfg, ["python", f"launch/{recipe}.py", *flags]


def _resources(cpu: int | str, mem_gi: int, gpus: int = 0) -> dict[str, Any]:
    """requests == limits: Guaranteed QoS, so the kubelet evicts these pods last."""
    res: dict[str, Any] = {"cpu": str(cpu), "memory": f"{mem_gi}Gi"}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(res), "limits": dict(res)}


def _security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "fsGroup": GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _ray_pod(
    name: str,
    image: str,
    resources: dict,
    shm_gi: int,
    prof: Profile,
    ports: list[dict] | None = None,
    gpu: bool = False,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent"}
    if ports:
        container["ports"] = ports
    env = prof.env if gpu else {}
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    container |= {
        "resources": resources,
        "securityContext": _security(),
        "volumeMounts": [
            {"name": "runs", "mountPath": MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "runs", "persistentVolumeClaim": {"claimName": PVC}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}},
        ],
    }
    if gpu and prof.node_selector:
        spec["nodeSelector"] = dict(prof.node_selector)
    if gpu and prof.tolerations:
        spec["tolerations"] = [dict(t) for t in prof.tolerations]
    return {"metadata": {"labels": dict(LABELS)}, "spec": spec}


def cluster_spec(cfg: C.JobConfig, prof: Profile, image: str) -> dict[str, Any]:
    """RayCluster spec: a head that runs no training and one worker group sized to the job."""
    s = cfg.scaling
    if prof.gpus_per_pod:
        if s.use_gpu == "false":
            raise ValueError(f"profile {prof.name} has GPUs but scaling.use_gpu=false")
        per_pod = prof.gpus_per_pod / s.gpus_per_worker
        if per_pod < 1 or not per_pod.is_integer():
            raise ValueError(
                f"scaling.gpus_per_worker={s.gpus_per_worker} does not divide the "
                f"{prof.gpus_per_pod} GPUs of a {prof.name} pod"
            )
        per_pod = int(per_pod)
        if s.workers % per_pod:
            raise ValueError(
                f"--workers {s.workers} does not fill whole {prof.name} nodes; "
                f"use a multiple of {per_pod}"
            )
    else:
        if s.use_gpu == "true":
            raise ValueError(f"scaling.use_gpu=true needs a GPU profile, not {prof.name}")
        per_pod = 1
    replicas = math.ceil(s.workers / per_pod)
    ray_cpus = math.ceil(per_pod * s.cpus_per_worker)
    worker_res = _resources(
        ray_cpus + prof.cpu_overhead,
        per_pod * prof.mem_per_worker_gi + prof.mem_overhead_gi,
        prof.gpus_per_pod,
    )
    worker_params = {"num-cpus": str(ray_cpus)}
    if prof.gpus_per_pod:
        worker_params["num-gpus"] = str(prof.gpus_per_pod)
    head_ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    return {
        "rayVersion": RAY_VERSION,
        # The operator injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret) into
        # every Ray container: Ray's default token auth, on Kubernetes.
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            "serviceType": "ClusterIP",  # the dashboard / job API stays inside the cluster
            "enableIngress": False,
            # num-cpus 0: no training worker lands on the head; the driver needs no CPU slot.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _ray_pod(
                "ray-head",
                image,
                _resources(prof.head_cpu, prof.head_mem_gi),
                min(prof.shm_gi, prof.head_mem_gi // 4),
                prof,
                head_ports,
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if prof.gpus_per_pod else "cpu-workers",
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": replicas,
                "rayStartParams": worker_params,
                "template": _ray_pod(
                    "ray-worker", image, worker_res, prof.shm_gi, prof, gpu=bool(prof.gpus_per_pod)
                ),
            }
        ],
    }


def job_runtime_env(working_dir: str | None) -> dict[str, Any]:
    """The job's runtime_env: the code to upload, what to leave out, the job's env vars."""
    env: dict[str, Any] = {"working_dir": working_dir} if working_dir else {}
    return env | {"excludes": list(EXCLUDES), "env_vars": dict(JOB_ENV)}


def _submitter(image: str) -> dict[str, Any]:
    """The K8s Job pod that runs `ray job submit` (KubeRay fills in the command)."""
    token = {"secretKeyRef": {"name": AUTH_SECRET, "key": "auth_token"}}
    return {
        "metadata": {"labels": dict(LABELS)},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": _pod_security(),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "env": [
                        {"name": "RAY_AUTH_MODE", "value": "token"},
                        {"name": "RAY_AUTH_TOKEN", "valueFrom": token},
                    ],
                    "resources": _resources("500m", 1),
                    "securityContext": _security(),
                }
            ],
        },
    }


def render(
    recipe: str,
    preset: str,
    image: str,
    workers: int | None = None,
    profile: str | None = None,
    sets: list[str] | None = None,
    run_dir: str | None = None,
    base_rel: str = "../../../base",
) -> Rendered:
    """RayJob + RayCluster (+ kustomization) for one recipe, preset and cluster size."""
    sets = list(sets or [])
    if workers is None:
        load_recipe(recipe)
        workers = C.load(recipe, preset, sets).scaling.workers
    run_dir = run_dir or f"{MOUNT}/runs/{recipe}-{preset}"
    cfg, entry = resolve_job(recipe, preset, workers, sets, run_dir)
    if profile is None:
        profile = "h100x8" if cfg.scaling.use_gpu == "true" else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile!r}: expected one of {sorted(PROFILES)}")
    spec = cluster_spec(cfg, PROFILES[profile], image)
    from system.trainer import accum_steps  # the check the job itself makes at step 0

    accum_steps(cfg, cfg.scaling.workers)
    name = dns_name(f"mnemo-{recipe}-{preset}")
    labels = LABELS | {"mnemosyne/recipe": recipe, "mnemosyne/preset": preset}
    runtime_env = yaml.safe_dump(job_runtime_env(APP_DIR), sort_keys=False)
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "submissionMode": "K8sJobMode",
            "entrypoint": shlex.join(entry),
            "runtimeEnvYAML": runtime_env,
            "metadata": {"recipe": recipe, "preset": preset},
            # Each retry is a fresh RayCluster; --resume auto continues from the newest
            # committed checkpoint in the run dir on the shared volume.
            "backoffLimit": 3,
            "activeDeadlineSeconds": PROFILES[profile].deadline_s,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "submitterConfig": {"backoffLimit": 2},
            "submitterPodTemplate": _submitter(image),
            "rayClusterSpec": spec,
        },
    }
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": f"{name}-cluster", "labels": labels},
        "spec": spec,
    }
    source = f"launch/{recipe}.py --preset {preset} --workers {cfg.scaling.workers}"
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base_rel, "rayjob.yaml"],
    }
    files = {
        "kustomization.yaml": dump(kustomization, f"RayJob {name} + base (PVC); {source}"),
        "rayjob.yaml": dump(job, f"{source}; runs once, then the cluster goes away"),
        "raycluster.yaml": dump(
            cluster,
            f"{source}; long-lived, for `ray job submit` "
            "(not in kustomization.yaml: apply with -f)",
        ),
    }
    return Rendered(cfg, entry, files)


class _Dumper(yaml.SafeDumper):
    """Indented lists and `|` blocks for multi-line strings: readable, diff-friendly YAML."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(doc: dict[str, Any], note: str) -> str:
    head = f"# Rendered by `mnemo k8s` ({note}). Do not edit: re-render.\n"
    return head + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1 << 16)


def base_files() -> dict[str, str]:
    """k8s/base: what every overlay shares (the run-dir volume) and the local runtime env."""
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": PVC, "labels": dict(LABELS)},
        # ReadWriteMany: head and every worker write the same run dir (checkpoints, metrics).
        # No storageClassName: the cluster default, or set an RWX class in a patch (README).
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "2Ti"}}},
    }
    kust = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["pvc.yaml"],
    }
    return {
        "base/kustomization.yaml": dump(kust, "shared objects of every overlay"),
        "base/pvc.yaml": dump(pvc, f"run dirs, mounted at {MOUNT}"),
        "runtime-env.yaml": dump(
            job_runtime_env(None), "runtime env for `ray job submit --working-dir .`"
        ),
    }


def examples() -> Iterator[tuple[str, str, Rendered]]:
    """(overlay, recipe, rendered) for every example: each recipe in launch/ on each profile."""
    for overlay, ex in EXAMPLES.items():
        for recipe in recipes():
            sets = EXAMPLE_SETS.get((recipe, overlay), [])
            try:
                r = render(recipe, ex["preset"], EXAMPLE_IMAGE, ex["workers"], ex["profile"], sets)
            except ValueError as e:
                raise ValueError(
                    f"example {overlay}/{recipe}: {e} (adapt the preset to this "
                    "world size in EXAMPLE_SETS, system/k8s.py)"
                ) from e
            yield overlay, recipe, r


def example_files() -> dict[str, str]:
    """Every committed file under k8s/ that `mnemo k8s examples` owns, by relative path."""
    files = base_files()
    for overlay, recipe, r in examples():
        for name, text in r.files.items():
            files[f"overlays/{overlay}/{recipe}/{name}"] = text
    return files


def stale_examples(k8s_dir: Path = K8S_DIR) -> list[str]:
    """Committed example files that differ from a fresh render, are missing, or are extra."""
    want = example_files()
    have = {str(p.relative_to(k8s_dir)) for p in (k8s_dir / "overlays").rglob("*.yaml")}
    bad = [
        rel
        for rel, text in want.items()
        if not (k8s_dir / rel).exists() or (k8s_dir / rel).read_text() != text
    ]
    return sorted(bad + [rel for rel in have - set(want)])


def _cmd_render(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    base_rel = os.path.relpath(K8S_DIR / "base", out.resolve()) if out else "../../../base"
    r = render(
        args.recipe,
        args.preset,
        args.image,
        args.workers,
        args.profile,
        args.overrides,
        args.run_dir,
        base_rel,
    )
    if out is None:
        print("---\n".join([r.files["rayjob.yaml"], r.files["raycluster.yaml"]]), end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in r.files.items():
        (out / name).write_text(text)
    print(f"wrote {', '.join(sorted(r.files))} to {out} ({r.cfg.scaling.workers} workers)")
    return 0


def _cmd_examples(args: argparse.Namespace) -> int:
    if args.check:
        bad = stale_examples()
        for rel in bad:
            print(f"stale: k8s/{rel}", file=sys.stderr)
        if bad:
            print("run `mnemo k8s examples` to re-render them", file=sys.stderr)
        return 1 if bad else 0
    files = example_files()
    for p in (K8S_DIR / "overlays").rglob("*.yaml"):
        if str(p.relative_to(K8S_DIR)) not in files:
            p.unlink()
    for rel, text in files.items():
        (K8S_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
        (K8S_DIR / rel).write_text(text)
    print(f"rendered {len(files)} files under {K8S_DIR}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnemo k8s", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="RayJob + RayCluster for one recipe")
    r.add_argument("recipe", help=f"a launch/ recipe: {', '.join(recipes())}")
    r.add_argument("--preset", default="full")
    r.add_argument("--image", required=True, help="container image built from k8s/Dockerfile")
    r.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: preset)")
    r.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="node kind (default: h100x8 if the preset needs GPUs, else cpu)",
    )
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed on to the recipe (repeatable)",
    )
    r.add_argument("--run-dir", default=None, help=f"default {MOUNT}/runs/RECIPE-PRESET")
    r.add_argument("--out", default=None, help="write kustomization/rayjob/raycluster here")
    e = sub.add_parser("examples", help="re-render the examples committed under k8s/")
    e.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _cmd_render(args) if args.cmd == "render" else _cmd_examples(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
