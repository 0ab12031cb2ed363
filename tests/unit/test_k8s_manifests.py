"""The KubeRay manifests under k8s/: valid, safe, up to date, and running the recipe's flags.

- RayJob / RayCluster against KubeRay's own CRD schemas (vendored in k8s/crds/kuberay), made
  strict the way `kubectl apply` (server-side field validation) is: an unknown field is an
  error, not silently pruned. CEL rules (x-kubernetes-validations) are not evaluated here.
- Core objects and every pod template inside the CRs against the Kubernetes OpenAPI schemas
  bundled with kubernetes-validate (strict, offline).
- Security: non-root, no privilege escalation, no capabilities, requests == limits on every
  container, the dashboard on a ClusterIP service with no ingress, the token only by reference.
- The committed files equal a fresh render, for every recipe in launch/.
Every validator is also shown a broken document and must reject it.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from system import config as C
from system import k8s
from system.cli import recipe_parser, resolve

ROOT = Path(__file__).resolve().parents[2]
K8S_ROOT = ROOT / "k8s"
CRD_DIR = K8S_ROOT / "crds" / "kuberay"  # vendored copy; SOURCE.md there says from where
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
K8S_VERSION = "1.33.0"  # a release kubernetes-validate bundles; KubeRay supports 1.23+
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 2 MB CRDs in ~2 s, not ~20 s
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# ---------------------------------------------------------------------------------------------
# Validators


def _strict(node: Any) -> Any:
    """OpenAPI v3 (structural CRD schema) -> JSON Schema rejecting unknown fields and nulls
    where the API server would prune or refuse them."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        pytest.fail(
            f"KubeRay CRD schemas not found at {CRD_DIR}: they are part of the repository "
            "(k8s/crds/refresh.sh REF fetches them again)"
        )
    validators = {}
    for kind, fname in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / fname).read_text(), Loader=_LOADER)
        assert crd["spec"]["names"]["kind"] == kind, fname
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(doc: dict, validators: dict[str, jsonschema.Draft7Validator]) -> list[str]:
    errs = [
        f"{doc['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validators[doc["kind"]].iter_errors(doc)
    ]
    name = doc["metadata"]["name"]
    if not DNS_LABEL.fullmatch(name) or len(name) > 63:
        errs.append(f"metadata.name {name!r} is not an RFC 1123 label")
    return errs


def core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(role, PodTemplateSpec) of a RayJob (submitter + its cluster) or RayCluster."""
    spec, out = doc["spec"], []
    if doc["kind"] == "RayJob":
        out.append(("submitter", spec["submitterPodTemplate"]))
        spec = spec["rayClusterSpec"]
    out.append(("head", spec["headGroupSpec"]["template"]))
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def as_pod_template(role: str, tmpl: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": tmpl}


_QTY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?$")
_SCALE = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _qty(text: str) -> float:
    m = _QTY.match(str(text))
    assert m, f"unparsed quantity {text!r}"
    return float(m.group(1)) * _SCALE[m.group(2)]


def security_problems(doc: dict) -> list[str]:
    """What would make this RayJob / RayCluster unsafe to apply; empty when it is fine."""
    bad = []
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    head = cluster["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        bad.append(f"head service type {head['serviceType']} exposes the dashboard")
    if head.get("enableIngress"):
        bad.append("an ingress exposes the dashboard")
    if cluster.get("authOptions", {}).get("mode") != "token":
        bad.append("Ray token authentication is off")
    for role, tmpl in pod_templates(doc):
        pod = tmpl["spec"]
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                bad.append(f"{role}: {flag}")
        if any("hostPath" in v for v in pod.get("volumes", [])):
            bad.append(f"{role}: hostPath volume")
        psc = pod.get("securityContext", {})
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{role}/{c['name']}"
            sc = c.get("securityContext", {})
            if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
                bad.append(f"{where}: runAsNonRoot is not set")
            if sc.get("runAsUser", psc.get("runAsUser")) in (None, 0):
                bad.append(f"{where}: runs as root (runAsUser)")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                bad.append(f"{where}: privileged")
            caps = sc.get("capabilities", {})
            if caps.get("drop") != ["ALL"] or caps.get("add"):
                bad.append(f"{where}: capabilities are not drop [ALL] with none added")
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            for key in ("cpu", "memory"):
                if key not in req or key not in lim:
                    bad.append(f"{where}: no {key} request and limit")
                elif _qty(req[key]) > _qty(lim[key]):
                    bad.append(f"{where}: {key} request above its limit")
            if req.get("nvidia.com/gpu") != lim.get("nvidia.com/gpu"):
                bad.append(f"{where}: GPU request != limit")
            for env in c.get("env", []):
                if re.search("TOKEN|SECRET|PASSWORD|KEY", env["name"]) and "value" in env:
                    bad.append(f"{where}: {env['name']} is a literal, not a Secret reference")
    return bad


# ---------------------------------------------------------------------------------------------
# What is checked: a fresh render of every example (every recipe now in launch/), and the files


@pytest.fixture(scope="module")
def rendered() -> list[tuple[str, str, k8s.Rendered]]:
    return list(k8s.examples())


def _docs(text: str) -> list[dict]:
    """The Kubernetes objects in a YAML file (runtime-env.yaml holds none)."""
    return [d for d in yaml.safe_load_all(text) if d and "kind" in d]


def _all_docs(rendered) -> list[tuple[str, dict]]:
    out = [(rel, d) for rel, text in k8s.base_files().items() for d in _docs(text)]
    for overlay, recipe, r in rendered:
        for name, text in r.files.items():
            out += [(f"overlays/{overlay}/{recipe}/{name}", d) for d in _docs(text)]
    return out


def _kind_docs(rendered, *kinds: str) -> list[tuple[str, dict]]:
    return [(rel, d) for rel, d in _all_docs(rendered) if d.get("kind") in kinds]


def test_every_recipe_has_both_examples(rendered):
    got = {(o, r) for o, r, _ in rendered}
    assert got == {(o, r) for o in k8s.EXAMPLES for r in k8s.recipes()}
    assert "transformer_lm" in k8s.recipes()


def test_ray_resources_match_kuberay_crds(rendered, crd_validators):
    docs = _kind_docs(rendered, "RayJob", "RayCluster")
    assert len(docs) == 2 * len(rendered)
    errs = [f"{rel}: {e}" for rel, d in docs for e in crd_errors(d, crd_validators)]
    assert not errs, "\n".join(errs)


def test_core_objects_and_pod_templates_match_kubernetes_schemas(rendered):
    errs, seen = [], 0
    for rel, d in _all_docs(rendered):
        if d["kind"] in ("RayJob", "RayCluster"):
            for role, tmpl in pod_templates(d):
                errs += [f"{rel} {role}: {e}" for e in core_errors(as_pod_template(role, tmpl))]
                seen += 1
        elif d["kind"] != "Kustomization":
            errs += [f"{rel}: {e}" for e in core_errors(d)]
            seen += 1
    assert not errs, "\n".join(errs)
    assert seen >= 5 * len(rendered)


def test_security_properties(rendered):
    errs = [
        f"{rel}: {p}"
        for rel, d in _kind_docs(rendered, "RayJob", "RayCluster")
        for p in security_problems(d)
    ]
    assert not errs, "\n".join(errs)
    kinds = {d["kind"] for _, d in _all_docs(rendered)}
    assert not kinds & {"Ingress", "Route", "Service"}, "nothing may expose the dashboard"


def test_rayjob_fields(rendered):
    for _overlay, _recipe, r in rendered:
        (job,) = _docs(r.files["rayjob.yaml"])
        spec = job["spec"]
        assert spec["submissionMode"] == "K8sJobMode"
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["working_dir"] == k8s.APP_DIR and ".git/" in env["excludes"]
        assert all(isinstance(v, str) for v in env["env_vars"].values())
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == k8s.RAY_VERSION
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
        assert "command" not in submitter, "KubeRay fills in the ray job submit command"
        token = {e["name"]: e for e in submitter["env"]}["RAY_AUTH_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["name"] == k8s.AUTH_SECRET
        for role, tmpl in pod_templates(job)[1:]:  # head and workers share the run-dir volume
            pod = tmpl["spec"]
            claims = [
                v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            ]
            assert claims == [k8s.PVC], role
            shm = [v for v in pod["volumes"] if v["name"] == "dshm"][0]["emptyDir"]
            assert shm["medium"] == "Memory", role
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert {"/dev/shm", k8s.MOUNT} <= mounts, role


def test_cluster_fits_the_job_and_gpu_nodes_are_complete(rendered):
    for overlay, _recipe, r in rendered:
        (job,) = _docs(r.files["rayjob.yaml"])
        (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        s = r.cfg.scaling
        params, replicas = group["rayStartParams"], group["replicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert group["minReplicas"] == replicas == group["maxReplicas"]
        assert int(params["num-cpus"]) * replicas >= s.workers * s.cpus_per_worker
        assert _qty(limits["cpu"]) > int(params["num-cpus"]), "room for the raylet"
        if overlay == "h100x8":
            assert limits["nvidia.com/gpu"] == params["num-gpus"] == "8"
            assert replicas * 8 == s.workers * s.gpus_per_worker, "whole 8-GPU nodes, all used"
            env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
            assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_IB_DISABLE"] == "0"
            assert "NCCL_SOCKET_IFNAME" in env
            tol = group["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tol
        else:
            assert "nvidia.com/gpu" not in limits and replicas == s.workers


def test_entrypoint_is_the_recipe_command_line(rendered):
    """Parsed by the recipe's own parser, the entrypoint resolves to the rendered config, which
    is the preset plus the example's overrides on the shared run dir."""
    for overlay, recipe, r in rendered:
        (job,) = _docs(r.files["rayjob.yaml"])
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", f"launch/{recipe}.py"]
        args = recipe_parser(recipe).parse_args(argv[2:])
        assert (args.resume, args.address) == ("auto", "auto")
        cfg = resolve(recipe, args)
        assert cfg.to_dict() == r.cfg.to_dict()
        assert cfg.run_dir.startswith(k8s.MOUNT + "/runs/")
        ex = k8s.EXAMPLES[overlay]
        sets = k8s.EXAMPLE_SETS.get((recipe, overlay), [])
        workers = ex["workers"] or C.load(recipe, ex["preset"]).scaling.workers
        preset = C.load(recipe, ex["preset"], [*sets, f"scaling.workers={workers}"]).to_dict()
        for key in ("run_dir", "resume", "address"):
            del preset[key]
        assert {k: v for k, v in cfg.to_dict().items() if k in preset} == preset


def test_entrypoint_runs_as_the_recipe_script(rendered):
    """The real script, given the entrypoint's flags, resolves the same config (no Ray)."""
    for overlay, recipe, r in rendered:
        argv = shlex.split(_docs(r.files["rayjob.yaml"])[0]["spec"]["entrypoint"])
        proc = subprocess.run(
            [sys.executable, *argv[1:], "--print-config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout) == r.cfg.to_dict(), f"{overlay}/{recipe}"


def test_committed_examples_are_up_to_date(tmp_path):
    stale = k8s.stale_examples()
    assert not stale, (
        "k8s/ differs from a fresh render; run `.venv/bin/mnemo k8s examples`:\n" + "\n".join(stale)
    )
    # ... and the comparison itself notices an edit.
    copy_dir = tmp_path / "k8s"
    for rel, text in k8s.example_files().items():
        (copy_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy_dir / rel).write_text(text)
    assert k8s.stale_examples(copy_dir) == []
    job = copy_dir / "overlays" / "h100x8" / "transformer_lm" / "rayjob.yaml"
    job.write_text(job.read_text().replace("--workers 64", "--workers 8"))
    (copy_dir / "overlays" / "h100x8" / "old.yaml").write_text("{}\n")
    assert k8s.stale_examples(copy_dir) == [
        "overlays/h100x8/old.yaml",
        "overlays/h100x8/transformer_lm/rayjob.yaml",
    ]


def test_kustomizations_name_existing_files():
    for kust in K8S_ROOT.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kust.read_text())["resources"]:
            assert (kust.parent / res).exists(), f"{kust}: {res} does not exist"


def test_image_matches_the_manifests():
    text = (K8S_ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["RAY_VERSION"] == k8s.RAY_VERSION
    assert int(args["MNEMO_UID"]) == k8s.UID and int(args["MNEMO_GID"]) == k8s.GID
    assert re.search(r"cuda", args["BASE_IMAGE"]) and "pytorch" in args["BASE_IMAGE"]
    assert re.search(r"^WORKDIR (\S+)$", text, re.M).group(1) == k8s.APP_DIR
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "${MNEMO_UID}:${MNEMO_GID}", "the image must end non-root"
    assert "'.[gpu]'" in text, "the image installs the project with the gpu extra"
    assert not re.search(r"^(ENV|ARG) \w*(TOKEN|SECRET|PASSWORD|KEY)", text, re.M | re.I)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_readme_paths_exist():
    text = (K8S_ROOT / "README.md").read_text()
    # RECIPE stands for any recipe: check it for each one in launch/.
    paths = {
        p.replace("RECIPE", r)
        for p in re.findall(r"\bk8s/[\w./-]+[\w/]", text)
        for r in k8s.recipes()
    }
    assert paths, "k8s/README.md names no k8s/ paths"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"k8s/README.md names paths that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------
# The checks can fail: broken documents are rejected.


def _job(rendered) -> dict:
    (job,) = _docs(rendered[-1][2].files["rayjob.yaml"])
    return job


@pytest.mark.parametrize(
    "breakage", ["replicas-string", "misspelt-field", "container-typo", "auth-mode", "missing-head"]
)
def test_crd_validation_rejects_broken_documents(rendered, crd_validators, breakage):
    doc = copy.deepcopy(_job(rendered))
    cluster = doc["spec"]["rayClusterSpec"]
    if breakage == "replicas-string":
        cluster["workerGroupSpecs"][0]["replicas"] = "8"
    elif breakage == "misspelt-field":
        doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    elif breakage == "container-typo":
        cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    elif breakage == "auth-mode":
        cluster["authOptions"]["mode"] = "tokens"
    elif breakage == "missing-head":
        del cluster["headGroupSpec"]
    assert crd_errors(doc, crd_validators), f"{breakage} passed the RayJob schema"
    assert not crd_errors(_job(rendered), crd_validators)


@pytest.mark.parametrize("breakage", ["uid-string", "bad-volume", "pvc-mode"])
def test_kubernetes_validation_rejects_broken_documents(rendered, breakage):
    role, tmpl = copy.deepcopy(pod_templates(_job(rendered))[1])
    pod = tmpl["spec"]
    if breakage == "uid-string":
        pod["securityContext"]["runAsUser"] = "1000"
        doc = as_pod_template(role, tmpl)
    elif breakage == "bad-volume":
        pod["volumes"][1]["emptyDir"]["medium"] = {"Memory": True}
        doc = as_pod_template(role, tmpl)
    else:
        doc = yaml.safe_load(k8s.base_files()["base/pvc.yaml"])
        doc["spec"]["accessModes"] = "ReadWriteMany"
    assert core_errors(doc), f"{breakage} passed the Kubernetes schema"


@pytest.mark.parametrize(
    "breakage",
    [
        "root",
        "escalation",
        "caps",
        "no-limits",
        "loadbalancer",
        "ingress",
        "literal-token",
        "no-auth",
        "hostpath",
    ],
)
def test_security_check_rejects_unsafe_documents(rendered, breakage):
    doc = copy.deepcopy(_job(rendered))
    cluster = doc["spec"]["rayClusterSpec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    c = worker["containers"][0]
    if breakage == "root":
        c["securityContext"]["runAsUser"] = 0
    elif breakage == "escalation":
        del c["securityContext"]["allowPrivilegeEscalation"]
    elif breakage == "caps":
        c["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]
    elif breakage == "no-limits":
        del c["resources"]["limits"]
    elif breakage == "loadbalancer":
        cluster["headGroupSpec"]["serviceType"] = "LoadBalancer"
    elif breakage == "ingress":
        cluster["headGroupSpec"]["enableIngress"] = True
    elif breakage == "literal-token":
        sub = doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        sub["env"][1] = {"name": "RAY_AUTH_TOKEN", "value": "abc"}
    elif breakage == "no-auth":
        del cluster["authOptions"]
    elif breakage == "hostpath":
        worker["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    assert security_problems(doc), f"{breakage} passed the security check"


# ---------------------------------------------------------------------------------------------
# The command line


def test_render_cli_writes_an_overlay(tmp_path, capsys):
    out = tmp_path / "ov"
    assert (
        k8s.main(
            [
                "render",
                "transformer_lm",
                "--preset",
                "smoke",
                "--image",
                "img:1",
                "--workers",
                "4",
                "--set",
                "train.micro_batch=4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "kustomization.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
    ]
    kust = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert (out / kust["resources"][0]).resolve() == (K8S_ROOT / "base").resolve()
    (job,) = _docs((out / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4
    assert job["spec"]["entrypoint"].endswith("--workers 4 --set train.micro_batch=4")
    assert k8s.main(["render", "transformer_lm", "--preset", "smoke", "--image", "img:1"]) == 0
    assert "kind: RayCluster" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["render", "nope", "--image", "i"], "no recipe 'nope'"),
        (["render", "transformer_lm", "--image", "i", "--workers", "4"], "multiple of 8"),
        (["render", "transformer_lm", "--image", "i", "--workers", "24"], "not a multiple of"),
        (
            ["render", "transformer_lm", "--preset", "full", "--image", "i", "--profile", "cpu"],
            "needs a GPU profile",
        ),
        (
            ["render", "transformer_lm", "--preset", "smoke", "--image", "i", "--set", "x.y=1"],
            "unknown config key",
        ),
    ],
)
def test_render_cli_errors_are_clear(capsys, argv, message):
    assert k8s.main(argv) == 2
    assert message in capsys.readouterr().err
