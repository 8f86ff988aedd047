"""The chart's optional parts around the server: an Ingress and a Gateway API HTTPRoute to the
Service, the `helm test` pod (its script run against a real `moe-serve`), and the init container
that downloads a model from the Hugging Face Hub at a pinned commit."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import skip_or_fail

from .helpers import CHART, FULLNAME, NAMESPACE, main_container

EXPOSED = CHART / "ci" / "ingress-gateway-values.yaml"
COMMIT = "1a758c50ecb6350748b9ce0a99d2352fd9fc11c9"


def service_port(docs) -> tuple[str, int]:
    svc = docs.one("Service", FULLNAME)
    (port,) = svc["spec"]["ports"]
    return svc["metadata"]["name"], port["port"]


def test_ingress_and_route_are_off_by_default(render):
    assert not {"Ingress", "HTTPRoute"} & render().kinds()


def test_ingress_routes_every_host_and_path_to_the_service(render):
    docs = render([EXPOSED])
    ing = docs.one("Ingress", FULLNAME)
    name, port = service_port(docs)
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ing["spec"]["tls"] == [{"secretName": "moe-example-com-tls", "hosts": ["moe.example.com"]}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "moe.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")
    assert path["backend"] == {"service": {"name": name, "port": {"number": port}}}
    # the defaults: any host, everything under /, the port follows service.port
    docs = render(set_values=["ingress.enabled=true", "service.port=9000"])
    (rule,) = docs.one("Ingress", FULLNAME)["spec"]["rules"]
    assert "host" not in rule and rule["http"]["paths"][0]["path"] == "/"
    assert rule["http"]["paths"][0]["backend"]["service"]["port"]["number"] == 9000


def test_http_route_attaches_to_the_gateway_and_routes_to_the_service(render):
    docs = render([EXPOSED])
    route = docs.one("HTTPRoute", FULLNAME)
    name, port = service_port(docs)
    assert route["spec"]["parentRefs"] == [{"name": "public-gateway", "namespace": "gateway-system",
                                            "sectionName": "https"}]
    assert route["spec"]["hostnames"] == ["moe.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": name, "port": port}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["timeouts"] == {"request": "600s"}


@pytest.mark.parametrize(("set_values", "set_json", "message"), [
    (["httpRoute.enabled=true"], [], "/httpRoute/parentRefs"),  # a route must name its gateway
    ([], ['httpRoute.timeouts={"request": "10 minutes"}'], "/httpRoute/timeouts/request"),
    ([], ['ingress.hosts=[{"host": "Moe_Example", "paths": [{"path": "/", "pathType": "Prefix"}]}]'],
     "/ingress/hosts/0/host"),
    ([], ['ingress.hosts=[{"host": "a.example.com", "paths": [{"path": "v1", "pathType": "Prefix"}]}]'],
     "/ingress/hosts/0/paths/0/path"),
    (["model.source=huggingface"], [], "model.huggingface.repo"),
    (["model.source=huggingface", "model.huggingface.repo=Qwen/Qwen3-30B-A3B"], [], "40-character commit"),
    (["model.huggingface.revision=main"], [], "/model/huggingface/revision"),
])
def test_bad_exposure_and_download_values_are_refused(render_fails, set_values, set_json, message):
    err = render_fails(set_values=set_values, set_json=set_json)
    assert message in err, err


# ---- helm test ----------------------------------------------------------------------------------

def test_pod(docs) -> dict:
    (pod,) = [d for d in docs.all("Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    return pod


test_pod.__test__ = False  # a helper, not a test


def test_helm_test_pod_calls_v1_models_through_the_service(render):
    docs = render([EXPOSED])
    pod = test_pod(docs)
    assert pod["spec"]["restartPolicy"] == "Never"
    c = main_container(pod)
    env = {e["name"]: e for e in c["env"]}
    name, port = service_port(docs)
    assert env["MODELS_URL"]["value"] == f"http://{name}.{NAMESPACE}.svc:{port}/v1/models"
    assert env["SERVED_MODEL_NAME"]["value"] == docs.config_env()["MOE_SERVE_SERVED_MODEL_NAME"]
    # the key comes from the same Secret the server reads
    server_env = {e["name"]: e for e in main_container(docs.server_pod_template())["env"]}
    assert env["API_KEY"]["valueFrom"] == server_env["MOE_SERVE_API_KEY"]["valueFrom"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "API_KEY" not in {e["name"] for e in main_container(test_pod(render())).get("env", [])}


def run_test_script(docs, url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = main_container(test_pod(docs))["args"][0]
    return subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "MODELS_URL": url, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def test_helm_test_script_passes_against_a_real_server_and_fails_when_it_should(render, tmp_path):
    from tests.server.conftest import start_server

    docs = render(set_values=["apiKey.value=sekrit"])
    served = docs.config_env()["MOE_SERVE_SERVED_MODEL_NAME"]
    server = start_server(["--api-key", "sekrit", "--served-model-name", served], tmp_path)
    try:
        url = server.url + "/v1/models"
        ok = run_test_script(docs, url, {"API_KEY": "sekrit", "SERVED_MODEL_NAME": served})
        assert ok.returncode == 0, ok.stderr + ok.stdout
        assert f"ok: {served} is served" in ok.stdout
        wrong_key = run_test_script(docs, url, {"API_KEY": "nope", "SERVED_MODEL_NAME": served})
        assert wrong_key.returncode != 0 and "401" in wrong_key.stderr
        other_model = run_test_script(docs, url, {"API_KEY": "sekrit", "SERVED_MODEL_NAME": "other"})
        assert other_model.returncode == 1 and "does not list the model other" in other_model.stderr
    finally:
        assert server.stop() == 0


# ---- model.source=huggingface -------------------------------------------------------------------

def test_hf_download_init_container_pins_the_commit(render):
    docs = render([EXPOSED])
    for _, tpl in docs.pod_templates():
        (init,) = tpl["spec"]["initContainers"]
        assert init["name"] == "hf-download"
        # the server's own image: huggingface_hub (the `hf` CLI) is a dependency of moe-serve
        assert init["image"] == main_container(docs.server_pod_template())["image"]
        env = {e["name"]: e for e in init["env"]}
        assert env["HF_REPO"]["value"] == "Qwen/Qwen1.5-MoE-A2.7B" and env["HF_REVISION"]["value"] == COMMIT
        assert env["HF_INCLUDE"]["value"] == "*.json *.safetensors tokenizer*"
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        assert env["MODEL_DIR"]["value"] == docs.config_env()["MOE_SERVE_MODEL"] == "/models/qwen3-moe"
        assert 'hf "$@"' in init["args"][0] and "--revision" in init["args"][0]
        mounts = {m["name"]: m for m in init["volumeMounts"]}
        assert mounts["model"]["mountPath"] == "/models" and not mounts["model"].get("readOnly")
        server_mounts = {m["name"]: m for m in main_container(tpl)["volumeMounts"]}
        assert server_mounts["model"]["readOnly"] is True
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert volumes["model"]["emptyDir"] == {"sizeLimit": "40Gi"}
    # a PVC instead: a restart finds the commit there
    docs = render([EXPOSED], set_values=["model.huggingface.pvcClaimName=models"])
    volumes = {v["name"]: v for v in docs.server_pod_template()["spec"]["volumes"]}
    assert volumes["model"] == {"name": "model", "persistentVolumeClaim": {"claimName": "models"}}


def test_hf_download_reaches_the_multinode_workers_too(render):
    docs = render([CHART / "ci" / "vllm-multinode-values.yaml"],
                  set_json=[f'model={json.dumps({"source": "huggingface", "huggingface": {"repo": "a/b", "revision": COMMIT}})}'])
    roles = {role: tpl for role, tpl in docs.pod_templates()}
    assert set(roles) == {"leader", "worker"}
    for tpl in roles.values():
        assert [c["name"] for c in tpl["spec"]["initContainers"]] == ["hf-download"]


class HubEmulator:
    """The Hub endpoints `hf download <repo> --revision <commit>` uses (HF_ENDPOINT): the tree
    listing of a commit and the files under /resolve/; everything else is a 404."""

    FILES: ClassVar[dict[str, bytes]] = {"config.json": b'{"model_type": "mixtral"}',
                                         "model.safetensors": b"\0" * 4096, "tokenizer.json": b"{}",
                                         "README.md": b"# tiny", "sub/extra.json": b"[]"}
    REPO = "org/tiny-moe"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        emu = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, head: bool) -> None:
                emu.requests.append((self.command, self.path, self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                tree, resolve = f"/api/models/{emu.REPO}/tree/{COMMIT}", f"/{emu.REPO}/resolve/{COMMIT}/"
                headers = {"Content-Type": "application/json"}
                if path == tree:
                    body = json.dumps([{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                       for p, b in emu.FILES.items()]).encode()
                elif path.startswith(resolve) and path[len(resolve):] in emu.FILES:
                    body = emu.FILES[path[len(resolve):]]
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
                else:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RevisionNotFound" if "/tree/" in path else "EntryNotFound")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    if not head:
                        self.wfile.write(b"{}")
                    return
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self.reply(False)

            def do_HEAD(self) -> None:
                self.reply(True)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub():
    emu = HubEmulator()
    yield emu
    emu.close()


def hf_script_env(docs, tmp_path: Path, hub: HubEmulator, **over: str) -> dict[str, str]:
    """The init container's environment, with the model volume and HOME under tmp_path, the Hub
    at the emulator and `hf` from the test environment on PATH."""
    hf = Path(sys.executable).parent / "hf"
    if not hf.exists():
        skip_or_fail("the `hf` CLI (huggingface_hub) is not installed next to the test interpreter")
    (init,) = docs.server_pod_template()["spec"]["initContainers"]
    env = {e["name"]: e.get("value", "") for e in init["env"] if "value" in e}
    env.update(MODEL_DIR=str(tmp_path / "models" / "m"), HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"),
               HF_ENDPOINT=hub.url, PATH=f"{hf.parent}:/usr/bin:/bin", **over)
    return env


def run_hf_script(docs, env: dict[str, str]) -> subprocess.CompletedProcess:
    (init,) = docs.server_pod_template()["spec"]["initContainers"]
    return subprocess.run(["sh", "-c", init["args"][0]], env=env, capture_output=True, text=True, timeout=180,
                          check=False)


def test_hf_download_script_fetches_the_commit_with_the_real_cli(render, hub, tmp_path):
    docs = render(set_json=[f'model={json.dumps({"source": "huggingface", "huggingface": {"repo": hub.REPO, "revision": COMMIT, "include": ["*.json", "*.safetensors"]}})}'])
    env = hf_script_env(docs, tmp_path, hub, HF_TOKEN="hf_test_token")
    proc = run_hf_script(docs, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dest = Path(env["MODEL_DIR"])
    for name, data in hub.FILES.items():
        if name.endswith((".json", ".safetensors")):
            assert (dest / name).read_bytes() == data, name
    assert not (dest / "README.md").exists()  # not in `include`
    assert (dest / f".moe-serve-complete-{COMMIT}").exists()
    # pinned: every request named the commit, and carried the token
    assert hub.requests and all(COMMIT in path for _, path, _ in hub.requests if "/api/models/" in path
                                or "/resolve/" in path)
    assert {auth for _, path, auth in hub.requests if "/resolve/" in path} == {"Bearer hf_test_token"}
    # a restart: the marker says the commit is there, the Hub is not asked again
    n = len(hub.requests)
    again = run_hf_script(docs, env)
    assert again.returncode == 0 and "already in" in again.stdout and len(hub.requests) == n


def test_hf_download_script_fails_on_an_unknown_commit(render, hub, tmp_path):
    other = "0" * 40
    docs = render(set_json=[f'model={json.dumps({"source": "huggingface", "huggingface": {"repo": hub.REPO, "revision": other}})}'])
    env = hf_script_env(docs, tmp_path, hub)
    proc = run_hf_script(docs, env)
    assert proc.returncode != 0, proc.stdout
    assert not (Path(env["MODEL_DIR"]) / f".moe-serve-complete-{other}").exists()
