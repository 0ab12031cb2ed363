"""`ray job submit` of a recipe to a real Ray head with token authentication (Ray's default).

This is how a KubeRay RayJob runs a recipe (its submitter pod calls `ray job submit`), shrunk
to one machine: a head with random ports in its own temp dir and its job API on loopback, a
client holding the token, the repo uploaded as the job's working dir. The job must join this
cluster, not start an embedded one. The token lives in a file of ours (RAY_AUTH_TOKEN_PATH,
given to head and client alike), not in the shared ~/.ray/auth_token. Ray maps
`--node-ip-address 127.0.0.1` to the machine's own address on Linux, so its RPC ports are
reachable from the host network, guarded by the same token. The head is killed by its process
group at the end (never `ray stop`, which would also kill other people's clusters here).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._runs import ROOT, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STEPS = 4


def _ray() -> str:
    exe = BIN / "ray"
    assert exe.exists(), f"{exe} is missing: install ray[default] into this venv (make setup)"
    return str(exe)


def _http(url: str, token: str | None) -> tuple[int, str]:
    """GET `url` (with the bearer token when given); returns (status, body)."""
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names `marker` (our private temp dir): ours to kill."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(int(entry.name))
    return found


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's process group, then SIGKILL it and any stray process of ours."""
    # `ray start --block` and its autoscaler monitor outlive a SIGTERM for 20+ s: 5 s is plenty.
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        break
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Head:
    """A `ray start --head --block` on loopback; `url` is its dashboard (job API)."""

    def __init__(self, temp_dir: str, token_file: Path) -> None:
        self.temp_dir = temp_dir
        self.token = token_file.read_text().strip()
        self.gcs_port = free_port()
        self.dash_port = free_port()
        self.url = f"http://127.0.0.1:{self.dash_port}"
        self.log = Path(temp_dir) / "head.log"
        self.env = _auth_env(token_file)
        # The job must find `python` and its packages through what it was given (the working
        # dir upload), not through this test's PYTHONPATH.
        self.env.pop("PYTHONPATH", None)
        self.env.pop("RAY_ADDRESS", None)
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        ports = ["--port", str(self.gcs_port), "--dashboard-port", str(self.dash_port)]
        for flag in (
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--node-manager-port",
            "--object-manager-port",
        ):
            ports += [flag, str(free_port())]
        flags = "--head --block --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1"
        flags += " --include-dashboard true --num-cpus 2 --num-gpus 0 --disable-usage-stats"
        cmd = [_ray(), "start", *flags.split(), "--temp-dir", temp_dir, *ports]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _ = _http(f"{self.url}/api/jobs/", self.token)
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.5)
        pytest.fail(f"the Ray head's job API did not come up in {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def get(self, path: str) -> dict | list:
        status, body = _http(self.url + path, self.token)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]}"
        return json.loads(body)


def _auth_env(token_file: Path) -> dict[str, str]:
    """Token mode, the token read from our own file (not the shared ~/.ray/auth_token)."""
    env = dict(os.environ)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return env


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="mnemo-rj-", dir="/tmp")  # short: Ray's socket paths
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    h = Head(temp_dir, token_file)
    try:
        h.wait_ready()
        yield h
    finally:
        _stop_head(h.proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_head_refuses_clients_without_the_token(head: Head):
    assert _http(f"{head.url}/api/jobs/", None)[0] == 401
    assert _http(f"{head.url}/api/jobs/", "0" * 64)[0] == 403
    bad = Path(head.temp_dir) / "wrong_token"
    bad.write_text("0" * 64)
    proc = subprocess.run(
        [_ray(), "job", "list", "--address", head.url],
        env=_auth_env(bad),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, "a client with the wrong token could list jobs"


def test_recipe_job_joins_the_submitted_cluster(head: Head, tmp_path: Path):
    run_dir = tmp_path / "run"
    sid = f"mnemo-test-{secrets.token_hex(4)}"
    cmd = [
        _ray(),
        "job",
        "submit",
        "--address",
        head.url,
        "--submission-id",
        sid,
        "--working-dir",
        ".",
        "--runtime-env",
        "k8s/runtime-env.yaml",
        "--",
        "python",
        "launch/titans_2m.py",
        "--preset",
        "smoke",
        "--address",
        "auto",
        "--run-dir",
        str(run_dir),
        "--resume",
        "never",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        "log.every=1",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=_auth_env(Path(head.temp_dir) / "auth_token"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    wall = time.monotonic() - t0
    job = head.get(f"/api/jobs/{sid}")
    logs = head.get(f"/api/jobs/{sid}/logs")["logs"]
    report = (
        f"ray job submit exit {proc.returncode} after {wall:.0f} s; job {job.get('status')}"
        f"\nSUBMIT STDERR:\n{proc.stderr[-3000:]}\nJOB LOGS:\n{logs[-6000:]}"
        f"\nHEAD:\n{head.tail()[-2000:]}"
    )
    assert job["status"] == "SUCCEEDED", report
    assert proc.returncode == 0, report

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["world_size"] == 2, summary

    # It joined the head we submitted to (RAY_ADDRESS), and no second cluster was started.
    joined = [x for x in logs.splitlines() if "Connecting to existing Ray cluster at" in x]
    assert joined and joined[0].endswith(f":{head.gcs_port}..."), report
    assert "Started a local Ray instance" not in logs, report
    nodes = head.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
    assert len(nodes) == 1 and nodes[0]["is_head_node"], nodes
    actors = head.get("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"].endswith("RayTrainWorker")]
    assert len(workers) == 2, [a["class_name"] for a in actors]
    assert {a["job_id"] for a in workers} == {job["job_id"]}, "Train workers ran in another job"

    # The upload left out the virtualenv, the git dir and old runs (.gitignore + excludes).
    pkg = job["runtime_env"]["working_dir"]
    assert pkg.startswith("gcs://_ray_pkg_"), job["runtime_env"]
    unpacked = (
        Path(head.temp_dir)
        / "session_latest"
        / "runtime_resources"
        / "working_dir_files"
        / pkg.removeprefix("gcs://").removesuffix(".zip")
    )
    assert (unpacked / "launch" / "titans_2m.py").exists(), f"{pkg} not unpacked at {unpacked}"
    for junk in (".venv", ".git", "runs"):
        assert not (unpacked / junk).exists(), f"{junk} was uploaded with the working dir"
    print(f"[ray job submit] {STEPS} steps on a 1-node token-auth cluster in {wall:.1f} s")
