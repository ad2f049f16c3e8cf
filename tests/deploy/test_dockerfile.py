"""Static checks of the Dockerfile: stages, user, tools, entry point (tests/image/ builds and runs it).

A deliberately small parser: it understands the instructions our Dockerfile uses and fails
loudly on a FROM it cannot follow, rather than guessing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from .kube import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RUNTIME_STAGES = ("runtime", "sgx")
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3-dev|libc6-dev)\b")


@dataclass
class Stage:
    name: str
    base: str  # an image reference, or the name of an earlier stage
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blanks, also between continuation lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
        else:
            lines.append(current + stripped)
            current = ""
    assert not current, "dangling line continuation"
    return lines


def parse() -> dict[str, Stage]:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(DOCKERFILE.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage needs a name: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], match.group(1))
            stage = Stage(match.group(2), base)
            stages[stage.name] = stage
        else:
            assert stage is not None, f"{keyword} before the first FROM"
            stage.instructions.append((keyword, rest))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it builds on, outermost last."""
    result = [stages[name]]
    while result[-1].base in stages:
        result.append(stages[result[-1].base])
    return result


def effective(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    for stage in chain(stages, name):
        for kw, rest in reversed(stage.instructions):
            if kw == keyword:
                return rest
    return None


def test_default_target_is_the_plain_runtime() -> None:
    assert list(parse())[-1] == "runtime", "`docker build .` must produce the runtime image"


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stages_are_slim_python_as_a_non_root_user(name: str) -> None:
    stages = parse()
    root_image = chain(stages, name)[-1].base
    assert "bookworm" in root_image, root_image
    assert "python3" in root_image, root_image
    assert stages["builder"].base == root_image, "the virtualenv must run on the Python it was built with"
    user = effective(stages, name, "USER")
    assert user is not None
    assert re.fullmatch(r"\d+(:\d+)?", user), "numeric, so runAsNonRoot can check it"
    assert int(user.split(":")[0]) not in (0, 65534), user


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stages_have_no_build_tools(name: str) -> None:
    for stage in chain(parse(), name):
        for keyword, rest in stage.instructions:
            if keyword == "RUN":
                assert not BUILD_TOOLS.search(rest), f"{stage.name}: {rest}"
            if keyword == "COPY" and "--from=" in rest:
                assert re.fullmatch(r"--from=builder /opt/veil /opt/veil", rest), f"{stage.name}: {rest}"


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stages_run_veil(name: str) -> None:
    stages = parse()
    entrypoint, cmd = effective(stages, name, "ENTRYPOINT"), effective(stages, name, "CMD")
    assert entrypoint is not None
    assert json.loads(entrypoint) == ["python", "-m"], "exec form, so signals reach the service"
    assert cmd is not None
    assert json.loads(cmd) == ["veil.services.gateway"]


def test_builder_installs_the_wheel_into_a_virtualenv() -> None:
    runs = " ".join(rest for kw, rest in parse()["builder"].instructions if kw == "RUN")
    assert "pip wheel --no-build-isolation --no-deps --wheel-dir /wheels ." in runs
    assert 'pip install --only-binary=:all: "$(ls /wheels/veil-*.whl)[server]"' in runs, "the server extra"
    assert "python3 -m venv /opt/veil" in runs


def test_sgx_signing_key_is_a_build_secret() -> None:
    runs = [rest for kw, rest in parse()["sgx"].instructions if kw == "RUN"]
    signing = [r for r in runs if "gramine-sgx-sign" in r]
    assert len(signing) == 1
    assert "--mount=type=secret,id=enclave-signing-key" in signing[0]


def test_dockerignore_is_an_allow_list_without_keys() -> None:
    lines = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "veil", "services", "enclave"}
    assert "**/*-key.pem" in lines
    # Everything the Dockerfile copies must be in the allow-list.
    copied = set()
    for stage in parse().values():
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and "--from=" not in rest:
                copied |= {
                    src.rstrip("/").split("/")[0] for src in rest.split()[:-1] if not src.startswith("$")
                }
    assert copied <= allowed, copied - allowed


def test_the_gramine_manifest_template_the_image_signs_exists() -> None:
    text = (REPO / "Dockerfile").read_text()
    (template,) = re.findall(r"^ARG GRAMINE_TEMPLATE=(\S+)$", text, flags=re.M)
    assert (REPO / template).is_file(), template
