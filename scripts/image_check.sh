#!/usr/bin/env bash
# Build the CPU image with podman and check it as it ships: start it (read-only root, the cache
# directory on a tmpfs, as the chart runs it), wait for /health, send a completion, a stream and
# a /metrics scrape, check the startup log's kernel plan (the C kernels, not the PyTorch
# fallback), then SIGTERM it during a stream and check the drain (the stream ends, exit code 0,
# the "SIGTERM: draining" log line). Prints the image size and the start time to /health.
#
#   scripts/image_check.sh                  # build (cached layers) + check
#   KERNELS=runtime-compiler scripts/image_check.sh   # the alternative: gcc in the runtime image,
#                                           # no prebuilt kernels (compiled at first start)
# Environment:
#   IMAGE            tag to build (default localhost/moe-serve:check-cpu)
#   BASE_IMAGE_CPU   base image (default: the local Debian base scripts/image_base.sh makes, as
#                    there is no registry here; python:3.11-slim-bookworm where there is one)
#   PORT             host port to serve on (host network; default 18731)
#   PODMAN           podman command (default: podman --runtime runc)
# No registry or Docker daemon is needed: podman builds from the local base; pip inside the
# build uses this machine's pip configuration (index mirror, find-links, CA certificates),
# mounted read-only for the build's RUN steps, never copied into a layer.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
IMAGE="${IMAGE:-localhost/moe-serve:check-cpu}"
PORT="${PORT:-18731}"
KERNELS="${KERNELS:-prebuilt}"
NAME="moe-serve-check-$$"
t_start=$(date +%s)
step() { echo "[image_check +$(( $(date +%s) - t_start ))s] $*"; }
fail() { echo "[image_check] FAIL: $*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  # shellcheck source=scripts/apt_lib.sh
  . scripts/apt_lib.sh
  apt_prepare image_check
  apt_install image_check podman debootstrap runc
fi
read -r -a POD <<< "${PODMAN:-podman --runtime runc}"
step "$("${POD[@]}" --version)"

# ---- base image --------------------------------------------------------------------------------
BASE="${BASE_IMAGE_CPU:-localhost/moe-serve-base:bookworm}"
if [[ "$BASE" == localhost/* ]]; then
  step "local base image $BASE"
  bash scripts/image_base.sh "$BASE"
fi

# ---- pip's configuration for the build: mounted, not copied ------------------------------------
PY=$(command -v python3)
[ -x .venv/bin/python ] && PY=.venv/bin/python
conf_dir=$(mktemp -d)
trap 'rm -rf "$conf_dir"; "${POD[@]}" rm -f -i "$NAME" >/dev/null 2>&1 || true' EXIT
mounts=()
# VARIANT explicitly: podman 4.x (buildah) skips the base-${VARIANT} stage when it comes from the default
build_args=(--build-arg VARIANT=cpu --build-arg "BASE_IMAGE_CPU=$BASE")
"$PY" - "$conf_dir/pip.conf" "$conf_dir/mounts" <<'PYEOF'
"""`pip config list` (files and PIP_* variables) as one [global] pip.conf; the host paths it names."""
import os, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
values = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    value = value.strip().strip("'\"")
    if name and value and (section in ("global", "install", ":env:") or not section):
        if section == ":env:" or name not in values:  # the environment wins over files
            values[name] = value
paths = set()
for value in values.values():
    for word in value.split():
        path = word[len("file://"):] if word.startswith("file://") else word
        if os.path.basename(path.rstrip("/")) == "simple":  # a PEP 503 index: its files lie beside it
            path = os.path.dirname(path.rstrip("/"))
        if path.startswith("/") and os.path.exists(path):
            paths.add(os.path.realpath(path) if os.path.isfile(path) else path.rstrip("/"))
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(values.items())))
with open(sys.argv[2], "w") as f:
    f.write("".join(p + "\n" for p in sorted(paths)))
PYEOF
if [ -s "$conf_dir/pip.conf" ] && [ "$(wc -l < "$conf_dir/pip.conf")" -gt 1 ]; then
  mounts+=(--volume "$conf_dir/pip.conf:/etc/pip.conf:ro")
  while read -r p; do mounts+=(--volume "$p:$p:ro"); done < "$conf_dir/mounts"
  step "pip configuration mounted for the build: $(grep -c = "$conf_dir/pip.conf") settings, $(wc -l < "$conf_dir/mounts") paths"
fi
# the CA certificates pip and apt trust here (a TLS-inspecting proxy's CA, say)
for ca in /etc/ssl/certs/ca-certificates.crt; do
  [ -f "$ca" ] && mounts+=(--volume "$ca:$ca:ro")
done
# torch: the variant's PyTorch index where it answers, else pip's own index (+cpu build pinned)
if ! "$PY" -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=10)" 2>/dev/null; then
  pinned=$(sed -n 's/^torch==//p' constraints.txt)
  step "download.pytorch.org unreachable: torch==$pinned+cpu from pip's configured index"
  build_args+=(--build-arg TORCH_INDEX=pip --build-arg "TORCH_SPEC=torch==$pinned+cpu")
fi
# the levels this machine can run must be among the prebuilt ones, or the check below fails
build_args+=(--build-arg "CPU_KERNEL_LEVELS=${CPU_KERNEL_LEVELS:-x86-64-v3 x86-64-v4}")

# ---- build ---------------------------------------------------------------------------------------
step "building $IMAGE (layers cached: a rerun rebuilds only what changed)"
t0=$(date +%s)
{ "${POD[@]}" build --network host --layers "${mounts[@]}" "${build_args[@]}" -t "$IMAGE" -f Dockerfile . 2>&1; \
  echo "build exit $?" > "$conf_dir/build.rc"; } | tee "$conf_dir/build.log" \
  | grep --line-buffered -E '^(\[[0-9]+/[0-9]+] )?(STEP|COMMIT|\[cpu_build\]|Successfully|Error|error)|--> Using cache' || true
if [ "$(cat "$conf_dir/build.rc")" != "build exit 0" ]; then
  tail -30 "$conf_dir/build.log"
  fail "the image did not build ($(cat "$conf_dir/build.rc"))"
fi
built_at=$("${POD[@]}" image inspect --format '{{.Created}}' "$IMAGE")
step "built in $(( $(date +%s) - t0 ))s ($built_at)"
RUN_IMAGE="$IMAGE"
if [ "$KERNELS" = runtime-compiler ]; then
  RUN_IMAGE="$IMAGE-cc"
  step "variant: a compiler in the runtime image, no prebuilt kernels -> $RUN_IMAGE"
  printf '%s\n' "FROM $IMAGE" "USER root" \
    "RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev && rm -rf /var/lib/apt/lists/* /opt/moe-serve" \
    "ENV MOE_SERVE_PREBUILT_KERNELS=" "USER 10001:10001" \
    | "${POD[@]}" build --network host "${mounts[@]}" -t "$RUN_IMAGE" -f - "$conf_dir" >/dev/null
fi
size=$("${POD[@]}" image inspect --format '{{.Size}}' "$RUN_IMAGE")
step "image $RUN_IMAGE: $(( size / 1000000 )) MB ($size bytes)"

# ---- run ---------------------------------------------------------------------------------------
# an empty directory at the cache dir, as the chart's emptyDir (podman 4's tmpfs ignores mode=)
mkdir -m 1777 "$conf_dir/cache"
step "starting it (read-only root, an empty cache dir mounted) on port $PORT"
t_run=$(date +%s.%N)
"${POD[@]}" run -d --name "$NAME" --network host \
  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --read-only --volume "$conf_dir/cache:/var/cache/moe-serve" \
  -e MOE_SERVE_PORT="$PORT" -e MOE_SERVE_DRAIN_TIMEOUT=30 "$RUN_IMAGE" >/dev/null
BASE_URL="http://127.0.0.1:$PORT"
"$PY" - "$BASE_URL" "$t_run" "${POD[*]}" "$NAME" <<'PYEOF' || { "${POD[@]}" logs "$NAME" 2>&1 | tail -40; fail "no /health"; }
import subprocess, sys, time, urllib.request
url, t0, pod, name = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
deadline = time.time() + 600
while time.time() < deadline:
    state = subprocess.run([*pod, "inspect", "--format", "{{.State.Status}}", name], capture_output=True, text=True)
    if state.stdout.strip() not in ("running", "created", "configured"):
        print(f"[image_check] the container is {state.stdout.strip() or state.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            if r.status == 200:
                print(f"[image_check] /health 200 after {time.time() - t0:.1f}s from podman run")
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PYEOF

# ---- requests ----------------------------------------------------------------------------------
"$PY" - "$BASE_URL" <<'PYEOF' || { "${POD[@]}" logs "$NAME" 2>&1 | tail -40; fail "requests"; }
import json, sys, urllib.request
url = sys.argv[1]
def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)
model = json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))["data"][0]["id"]
out = json.load(post("/v1/completions", {"model": model, "prompt": "The image", "max_tokens": 8, "temperature": 0}))
assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 8, out
print(f"[image_check] completion: {out['choices'][0]['text']!r} ({out['usage']})")
chunks, done = 0, False
with post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 8, "stream": True}) as r:
    for line in r:
        line = line.decode().strip()
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunks += 1
assert done and chunks >= 2, (chunks, done)
print(f"[image_check] stream: {chunks} chunks, then [DONE]")
schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
out = json.load(post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "json"}],
                    "max_tokens": 24, "temperature": 0,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}))
text = out["choices"][0]["message"]["content"]
assert text.lstrip().startswith("{"), text  # the grammar (xgrammar, in the image) held the output
if out["choices"][0]["finish_reason"] == "stop":
    assert isinstance(json.loads(text)["answer"], int), text
print(f"[image_check] structured output (json_schema): {text!r}")
metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
ok = [line for line in metrics.splitlines() if line.startswith("vllm:request_success_total{")]
assert ok and sum(float(line.rsplit(" ", 1)[1]) for line in ok) >= 2, ok
print(f"[image_check] /metrics: {len(metrics.splitlines())} lines, request_success_total = "
      f"{sum(float(line.rsplit(' ', 1)[1]) for line in ok):g}")
PYEOF

# ---- kernel plan -------------------------------------------------------------------------------
plan=$("${POD[@]}" logs "$NAME" 2>&1 | grep -m1 'kernel plan (' || true)
step "startup log: ${plan#*] }"
case "$plan" in
  *"C kernels: openmp"*|*"C kernels: pthreads"*) ;;
  *) "${POD[@]}" logs "$NAME" 2>&1 | grep -i -E 'kernel|warn' | head -20; fail "the kernel plan does not show the C kernels" ;;
esac
if [ "$KERNELS" = prebuilt ] && [[ "$plan" != *"(prebuilt x86-64-v"* ]]; then
  fail "the C kernels were not the prebuilt ones"
fi

# ---- SIGTERM during a stream: drained -----------------------------------------------------------
step "SIGTERM while a stream is in flight"
"$PY" - "$BASE_URL" "${POD[*]}" "$NAME" <<'PYEOF' || { "${POD[@]}" logs "$NAME" 2>&1 | tail -20; fail "drain"; }
import json, subprocess, sys, threading, time, urllib.request
url, pod, name = sys.argv[1], sys.argv[2].split(), sys.argv[3]
model = json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))["data"][0]["id"]
req = urllib.request.Request(url + "/v1/completions", json.dumps(
    {"model": model, "prompt": "Once", "max_tokens": 256, "min_tokens": 256, "stream": True}).encode(),
    {"Content-Type": "application/json"})
got, done = [], threading.Event()
with urllib.request.urlopen(req, timeout=120) as r:
    first = r.readline()
    got.append(first)
    subprocess.run([*pod, "kill", "--signal", "TERM", name], check=True, capture_output=True)
    for line in r:
        got.append(line)
text = b"".join(got).decode()
assert text.rstrip().endswith("data: [DONE]"), text[-300:]
print(f"[image_check] the stream in flight at SIGTERM finished: {text.count('data: ') - 1} chunks, then [DONE]")
PYEOF
code=$("${POD[@]}" wait "$NAME")
logs=$("${POD[@]}" logs "$NAME" 2>&1)
drain=$(grep -m1 'SIGTERM: draining' <<< "$logs" || true)
[ -n "$drain" ] || fail "no 'SIGTERM: draining' log line"
[ "$code" = 0 ] || { tail -20 <<< "$logs"; fail "exit code $code after SIGTERM"; }
step "exit code 0; log: ${drain#*] }"
step "OK: image $RUN_IMAGE, $(( size / 1000000 )) MB; $(( $(date +%s) - t_start ))s in all"
