"""The Dockerfile's sgx stage: what can be checked without Gramine, and the build where it can be.

Gramine's packages come from its own apt repository. Where that answers, the stage is built and
signed with a throwaway key; elsewhere that test is skipped with the reason, and the manifest
template is rendered with the Dockerfile's own `gramine-manifest -D` variables (and the Python
paths gramine-manifest takes from the image's Debian python3) to check that it renders, parses
as TOML, and trusts and mounts only files that exist in the image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import REPO_ROOT
from tests.image.conftest import DOCKER, IMAGE_SH, Image, docker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

DOCKERFILE = REPO_ROOT / "Dockerfile"
GRAMINE_REPOSITORY = "https://packages.gramineproject.io/gramine-keyring.gpg"
#: Where Debian's gramine package keeps its libraries (gramine-manifest's `gramine.*`); not in
#: the runtime image, so only named here.
GRAMINE_PKGLIBDIR = PurePosixPath("/usr/lib/x86_64-linux-gnu/gramine")
#: gramine-manifest's `python.stdlib` and `python.distlib` (graminelibos/gen_jinja_env.py).
PYTHON_PATHS = (
    "import json, sys, sysconfig; print(json.dumps({'python.stdlib': sysconfig.get_paths()['stdlib'], "
    "'python.distlib': sysconfig.get_path('stdlib', vars={'py_version_short': sys.version_info[0]})"
    " + '/dist-packages'}))"
)
EXPRESSION = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def manifest_command() -> tuple[str, dict[str, str]]:
    """The sgx stage's template path and its `gramine-manifest -D` variables."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    sgx = text[text.index("FROM base AS sgx") :]
    (template,) = re.findall(r"^ARG GRAMINE_TEMPLATE=(\S+)$", sgx, flags=re.M)
    (options,) = re.findall(r"gramine-manifest ((?:-D\w+=\S+\s+)+)veil-enclave\.manifest\.template", sgx)
    return template, dict(re.findall(r"-D(\w+)=(\S+)", options))


def render(template: str, values: dict[str, str]) -> str:
    """The template with every expression replaced; any expression without a value fails, as
    gramine-manifest's StrictUndefined does."""
    for syntax in ("{%", "{#"):
        assert syntax not in template, "the template grew statements or comments: render it with Jinja"

    def value(match: re.Match[str]) -> str:
        expression = match.group(1)
        assert expression in values, f"the template uses {expression!r}, which the sgx stage does not define"
        return values[expression]

    return EXPRESSION.sub(value, template)


def image_path(path: PurePosixPath, variables: dict[str, str]) -> PurePosixPath | None:
    """Where `path` is in the runtime image; None for Gramine's own files (not installed there)."""
    if path.is_relative_to(GRAMINE_PKGLIBDIR):
        return None
    root = PurePosixPath(variables["veil_root"])
    if path.is_relative_to(root):
        # The sgx stage copies these from the installed package (its RUN's cp lines).
        site = PurePosixPath(variables["site_packages"])
        relative = path.relative_to(root)
        return site / relative if relative.parts[0] == "veil" else site / "veil" / relative
    return path


def test_the_sgx_manifest_template_renders_with_the_stages_variables(image: Image) -> None:
    template_path, variables = manifest_command()
    python = json.loads(
        docker(
            "run",
            "--rm",
            "--network",
            "host",
            "--entrypoint",
            "/usr/bin/python3",
            image.tag,
            "-c",
            PYTHON_PATHS,
        ).stdout
    )
    values = {
        **variables,
        **python,
        "gramine.libos": str(GRAMINE_PKGLIBDIR / "libsysdb.so"),
        "gramine.runtimedir()": str(GRAMINE_PKGLIBDIR / "runtime" / "glibc"),
    }
    manifest = tomllib.loads(render((REPO_ROOT / template_path).read_text(), values))
    assert manifest["sgx"]["debug"] is False
    assert (manifest["sgx"]["isvprodid"], manifest["sgx"]["isvsvn"]) == (1, 1)
    assert manifest["loader"]["argv"][:3] == ["python3", "-m", "veil.enclave.runner"]
    uris = [*manifest["sgx"]["trusted_files"], *(m["uri"] for m in manifest["fs"]["mounts"] if "uri" in m)]
    checks = {}
    for uri in uris:
        assert uri.startswith("file:"), uri
        path = image_path(PurePosixPath(uri.removeprefix("file:")), variables)
        if path is not None:
            checks[str(path)] = "dir" if uri.endswith("/") else "any"
    assert len(checks) > 10, checks
    program = (
        "import json, os, sys; checks = json.loads(sys.argv[1]); "
        "print(json.dumps([p for p, kind in checks.items() "
        "if not (os.path.isdir(p) if kind == 'dir' else os.path.exists(p))]))"
    )
    missing = json.loads(
        docker(
            "run", "--rm", "--network", "host", "--entrypoint", "/usr/bin/python3", image.tag,
            "-c", program, json.dumps(checks),
        ).stdout
    )  # fmt: skip
    assert missing == [], f"the manifest trusts or mounts paths the image does not have: {missing}"


def gramine_reachable() -> str | None:
    """None if Gramine's repository answers, else why not."""
    try:
        with urllib.request.urlopen(GRAMINE_REPOSITORY, timeout=5) as reply:  # a fixed https URL
            reply.read(1)
    except (urllib.error.URLError, OSError) as exc:
        return (
            f"{GRAMINE_REPOSITORY} unreachable ({exc}): the sgx target (Gramine, signing) is not built here"
        )
    return None


def test_the_sgx_target_builds_and_signs(image: Image, tmp_path: Path) -> None:
    reason = gramine_reachable()
    if reason is not None:
        pytest.skip(reason)
    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    key_file = tmp_path / "enclave-key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tag = f"{image.tag}-sgx"
    env = {
        "VEIL_IMAGE": tag,
        "VEIL_IMAGE_TARGET": "sgx",
        "VEIL_BUILD_ARGS": f"--secret id=enclave-signing-key,src={key_file}",
    }
    built = subprocess.run(
        [str(IMAGE_SH), "build"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, **env},
    )
    try:
        assert built.returncode == 0, built.stderr[-4000:]
        measured = json.loads(
            docker("run", "--rm", "--entrypoint", "cat", tag, "/opt/veil/gramine/mrenclave.json").stdout
        )
        assert re.fullmatch(r"[0-9a-f]{64}", measured["mr_enclave"]), measured
    finally:
        subprocess.run([DOCKER, "rmi", tag], capture_output=True, check=False, timeout=60)
