"""``veil attest verify``: exit codes, one JSON object on stdout, ``error: <reason>`` on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.cli.attest import main, verify_main
from veil.verify.roots import (
    INTEL_SGX_ROOT_PUBLIC_KEY_HEX,
    RootError,
    dev_root_path,
    load_root_pem,
    resolve_root,
)

from . import fakes
from .vectors import COLLATERAL_A, QUOTE_A, QUOTE_A_FACTS, QUOTE_B, REPO_ROOT, vector_path

NOW_ARG = ["--now", "2025-07-01T00:00:00Z"]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = verify_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _tampered(tmp_path: Path) -> Path:
    raw = bytearray(vector_path(QUOTE_A).read_bytes())
    raw[120] ^= 0x01  # inside MRENCLAVE
    path = tmp_path / "tampered.bin"
    path.write_bytes(bytes(raw))
    return path


def test_valid_quote_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, [str(vector_path(QUOTE_A)), *NOW_ARG])
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    assert json.loads(out) == QUOTE_A_FACTS


def test_debug_quote(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, [str(vector_path(QUOTE_B)), "--root", "intel", *NOW_ARG])
    assert code == 0
    assert json.loads(out)["debug"] is True


def test_collateral_adds_tcb_status(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(vector_path(QUOTE_A)), "--collateral", str(vector_path(COLLATERAL_A)), *NOW_ARG]
    code, out, err = _run(capsys, argv)
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert result["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert result["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


def test_expired_collateral_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        str(vector_path(QUOTE_A)),
        "--collateral",
        str(vector_path(COLLATERAL_A)),
        "--now",
        "2025-07-20T00:00:00+00:00",
    ]
    code, out, err = _run(capsys, argv)
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert "expired" in err


def test_invalid_quote_exits_1_with_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _run(capsys, [str(_tampered(tmp_path)), *NOW_ARG])
    assert (code, out) == (1, "")
    assert err == "error: quote signature does not verify with the attestation key\n"


def test_malformed_collateral_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "collateral.json"
    bad.write_text("{}")
    code, _, err = _run(capsys, [str(vector_path(QUOTE_A)), "--collateral", str(bad), *NOW_ARG])
    assert code == 1
    assert err.startswith("error: collateral: missing")


def test_naive_now_means_utc(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(vector_path(QUOTE_A)), "--collateral", str(vector_path(COLLATERAL_A))]
    assert _run(capsys, [*argv, "--now", "2025-07-01"])[0] == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["/nonexistent/quote.bin"],
        ["QUOTE", "--now", "yesterday"],
        ["QUOTE", "--collateral", "/nonexistent/collateral.json"],
        ["QUOTE", "--root", "/nonexistent/root.pem"],
        ["QUOTE", "--bogus"],
    ],
)
def test_usage_and_io_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    argv = [str(vector_path(QUOTE_A)) if a == "QUOTE" else a for a in argv]
    code, out, err = _run(capsys, argv)
    assert (code, out) == (2, "")
    assert err


def test_dev_root_from_the_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pki = fakes.make_pki()
    root_file = dev_root_path(tmp_path)
    root_file.parent.mkdir(parents=True)
    root_file.write_bytes(fakes.pem(pki.root))
    quote = tmp_path / "sim.quote"
    quote.write_bytes(fakes.build_quote(pki))

    dev = ["--root", "dev", "--data-dir", str(tmp_path), *NOW_ARG]
    code, out, _ = _run(capsys, [str(quote), *dev])
    assert code == 0
    assert json.loads(out)["mrenclave"] == "e1" * 32
    # The dev root never vouches for an Intel quote, nor Intel's root for a sim quote.
    code, _, err = _run(capsys, [str(vector_path(QUOTE_A)), *dev])
    assert code == 1
    assert "pinned root" in err
    code, _, err = _run(capsys, [str(quote), *NOW_ARG])
    assert code == 1
    assert "pinned root" in err
    # A root given as a PEM path works the same.
    code, _, _ = _run(capsys, [str(quote), "--root", str(root_file), *NOW_ARG])
    assert code == 0


def test_dev_pki_sim_chain_verifies_with_the_dev_root(
    capsys: pytest.CaptureFixture[str], pki_dir: Path, tmp_path: Path
) -> None:
    # The sim PCK chain that `veil pki init` writes is what the sim quote provider signs with.
    leaf_key = serialization.load_pem_private_key((pki_dir / "sgx-pck-leaf-key.pem").read_bytes(), None)
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    chain = b"".join(
        (pki_dir / name).read_bytes() for name in ("sgx-pck-leaf.pem", "sgx-pck-ca.pem", "sgx-root.pem")
    )
    quote = tmp_path / "sim.quote"
    quote.write_bytes(fakes.build_quote(fakes.PemPckSigner(leaf_key, chain)))
    code, out, err = _run(capsys, [str(quote), "--root", "dev", "--data-dir", str(pki_dir.parent)])
    assert (code, err) == (0, "")
    assert json.loads(out)["isv_prod_id"] == 7
    code, _, err = _run(capsys, [str(quote)])
    assert code == 1
    assert "pinned root" in err


def test_dev_root_missing_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [str(vector_path(QUOTE_A)), "--root", "dev", "--data-dir", str(tmp_path)]
    code, _, err = _run(capsys, argv)
    assert code == 2
    assert "sgx-root.pem" in err


def test_roots(tmp_path: Path) -> None:
    pki = fakes.make_pki()
    cert_file = tmp_path / "root.pem"
    cert_file.write_bytes(fakes.pem(pki.root))
    key_file = tmp_path / "root-key.pem"
    key_file.write_bytes(
        pki.root_public_key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    for path in (cert_file, key_file):
        assert (
            fakes.raw_public(pki.root_key)
            == load_root_pem(path).public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )[1:]
        )
    intel = resolve_root("intel").public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert intel.hex() == INTEL_SGX_ROOT_PUBLIC_KEY_HEX
    assert dev_root_path(Path("d")) == Path("d/pki/sgx-root.pem")
    two = tmp_path / "two.pem"
    two.write_bytes(fakes.pem(pki.root, pki.ca))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    for bad in (str(two), str(garbage), "", str(tmp_path / "missing.pem")):
        with pytest.raises(RootError):
            resolve_root(bad)


def test_module_main_requires_the_verify_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["check", str(vector_path(QUOTE_A))]) == 2
    capsys.readouterr()
    assert main(["verify", str(vector_path(QUOTE_A)), *NOW_ARG]) == 0
    assert json.loads(capsys.readouterr().out)["isv_svn"] == 0


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "veil.cli.attest", "verify", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_subprocess_valid_and_invalid(tmp_path: Path) -> None:
    ok = _python_m(str(vector_path(QUOTE_A)), "--collateral", str(vector_path(COLLATERAL_A)), *NOW_ARG)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    assert json.loads(ok.stdout)["tcb_status"] == "ConfigurationAndSWHardeningNeeded"

    bad = _python_m(str(_tampered(tmp_path)), *NOW_ARG)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.startswith("error: ")
    assert "signature" in bad.stderr
