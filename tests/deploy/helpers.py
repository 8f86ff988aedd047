"""Chart paths, rendered-manifest lookups and helm invocation shared by the deployment tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moe-serve"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
TOOLS_BIN = REPO / ".tools" / "bin"
NAMESPACE = "inference"
RELEASE = "t"
FULLNAME = f"{RELEASE}-moe-serve"
VALUE_SETS = [None, *CI_VALUES]  # None: the chart's defaults
IDS = ["default", *(p.stem for p in CI_VALUES)]


def files(values_file) -> tuple:
    """helm -f arguments for one entry of VALUE_SETS."""
    return () if values_file is None else (values_file,)


def main_container(pod_template: dict) -> dict:
    return pod_template["spec"]["containers"][0]


class Rendered(list):
    """The documents `helm template` printed, with lookups by kind."""

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, rendered {len(found)}"
        return found[0]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        return found[0] if found else None

    def pod_templates(self) -> list[tuple[str, dict[str, Any]]]:
        """(role, pod template) of every workload: Deployment pods, LWS leaders and workers."""
        out = []
        for d in self.all("Deployment"):
            out.append(("server", d["spec"]["template"]))
        for d in self.all("LeaderWorkerSet"):
            tpl = d["spec"]["leaderWorkerTemplate"]
            out.append(("leader", tpl["leaderTemplate"]))
            out.append(("worker", tpl["workerTemplate"]))
        return out

    def server_pod_template(self) -> dict[str, Any]:
        """The pod template of the pods that serve HTTP."""
        return next(t for role, t in self.pod_templates() if role in ("server", "leader"))

    def config_env(self) -> dict[str, str]:
        return self.one("ConfigMap", f"{RELEASE}-moe-serve")["data"]


def helm_path() -> Path:
    return TOOLS_BIN / "helm"


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], check=False, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template_args(values_files=(), set_values=(), set_json=(), kube_version: str | None = None) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if kube_version:
        args += ["--kube-version", kube_version]
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    for s in set_json:
        args += ["--set-json", s]
    return args


def moe_serve_executable() -> str | None:
    """The console script of the environment running the tests, else one on PATH."""
    here = Path(sys.executable).parent / "moe-serve"
    if here.exists():
        return str(here)
    return shutil.which("moe-serve")


def env_to_flag(name: str) -> str:
    """MOE_SERVE_MAX_NUM_SEQS -> --max-num-seqs (the CLI's env convention)."""
    assert name.startswith("MOE_SERVE_"), name
    return "--" + name[len("MOE_SERVE_"):].lower().replace("_", "-")

