"""mTLS identity attacks on every method of the keyvault and the state service.

* every identity a method's authorization table does not list gets PERMISSION_DENIED
  (the whole matrix, not a sample), and nothing changes;
* no client certificate, or one from another CA carrying the right SPIFFE ID: the TLS
  handshake fails (UNAVAILABLE), the handler never runs;
* a certificate from *our* CA with a foreign trust domain, two SPIFFE IDs, or none:
  UNAUTHENTICATED; with an unknown identity in our trust domain: PERMISSION_DENIED.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.attack.mesh import IDENTITIES, SERVICE_TARGETS, TIMEOUT, Lab, ServiceTarget
from tests.attack.rpc import call_raw
from veil.dev.pki import ca_key_dir, init_pki
from veil.status import error_info

FORBIDDEN = [
    pytest.param(target, method.name, name, id=f"{target.name}.{method.name}-as-{name}")
    for target in SERVICE_TARGETS
    for method in target.methods
    for name, spiffe in sorted(IDENTITIES.items())
    if spiffe not in target.authorization.get(target.path(method.name), frozenset())
]


@pytest.mark.parametrize(("target", "method", "caller"), FORBIDDEN)
def test_an_identity_the_table_does_not_list_is_denied(
    lab: Lab, target: ServiceTarget, method: str, caller: str
) -> None:
    running = lab.get(target)
    before = running.snapshot()
    with pytest.raises(grpc.RpcError) as denied:
        call_raw(running, target.service.methods_by_name[method], b"", identity=caller)
    info = error_info(denied.value)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info is not None
    assert info.metadata["caller"] == IDENTITIES[caller]
    assert running.snapshot() == before


def _ping(target: ServiceTarget, port: int, credentials: grpc.ChannelCredentials) -> grpc.RpcError:
    """Call the first method with `credentials`; returns the refusal (fails if it succeeds)."""
    method = target.methods[0]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(target.path(method.name))
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=TIMEOUT)
    return refused.value


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rogue") / "pki"
    init_pki(directory, now=dt.datetime.now(dt.UTC))
    return directory


@pytest.mark.parametrize("target", SERVICE_TARGETS, ids=lambda t: t.name)
def test_no_certificate_or_one_from_another_ca_never_gets_in(
    lab: Lab, pki_dir: Path, rogue_pki: Path, target: ServiceTarget
) -> None:
    running = lab.get(target)
    root = (pki_dir / "ca.pem").read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=root)
    assert _ping(target, running.port, anonymous).code() == grpc.StatusCode.UNAVAILABLE
    for name in IDENTITIES:  # the right SPIFFE IDs, signed by a CA the server does not trust
        rogue = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=(rogue_pki / f"{name}-key.pem").read_bytes(),
            certificate_chain=(rogue_pki / f"{name}.pem").read_bytes(),
        )
        assert _ping(target, running.port, rogue).code() == grpc.StatusCode.UNAVAILABLE, name


def _certificate(pki_dir: Path, uris: list[str]) -> tuple[bytes, bytes]:
    """A client certificate signed by the dev CA itself, with the given URI SANs."""
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (ca_key_dir(pki_dir) / "ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.mark.parametrize("target", SERVICE_TARGETS, ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("uris", "code"),
    [
        (["spiffe://evil/gateway"], grpc.StatusCode.UNAUTHENTICATED),  # another trust domain
        (["spiffe://veil/gateway", "spiffe://veil/admin"], grpc.StatusCode.UNAUTHENTICATED),  # two IDs
        ([], grpc.StatusCode.UNAUTHENTICATED),  # no SPIFFE ID at all
        (["https://veil/admin"], grpc.StatusCode.UNAUTHENTICATED),  # not a SPIFFE URI
        (["spiffe://veil/root"], grpc.StatusCode.PERMISSION_DENIED),  # ours, but nobody's identity
    ],
    ids=["foreign-domain", "two-ids", "no-id", "not-spiffe", "unknown-id"],
)
def test_a_certificate_from_our_ca_must_carry_exactly_one_listed_identity(
    lab: Lab, pki_dir: Path, target: ServiceTarget, uris: list[str], code: grpc.StatusCode
) -> None:
    running = lab.get(target)
    before = running.snapshot()
    cert, key = _certificate(pki_dir, uris)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.pem").read_bytes(), private_key=key, certificate_chain=cert
    )
    refused = _ping(target, running.port, credentials)
    assert refused.code() == code
    assert running.snapshot() == before
