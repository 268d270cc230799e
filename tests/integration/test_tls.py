"""TLS and mutual TLS on the services' ports, with certificates made here, the real grpcurl
with -cacert, and registration's own client to enrollment trusting TLS_CA_FILE."""

from __future__ import annotations

import datetime as dt
import ipaddress
import pathlib
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.type import date_pb2

from coursesignup.enrollment.v1 import enrollment_pb2 as pb
from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from services.registration.bootstrap import build_hooks as registration_hooks
from services.registration.settings import RegistrationSettings
from tests import helpers

GRPCURL = helpers.ROOT / ".venv" / "bin" / "grpcurl"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: pathlib.Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a service certificate
    good for both ends of a connection."""
    directory = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": _write(directory / "ca", ca_key, ca)[0]}

    def issue(name: str, *usages: x509.ObjectIdentifier) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[f"{name}_cert"], files[f"{name}_key"] = _write(directory / name, key, cert)

    issue("server", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
    # A service's certificate: registration serves with it and presents it to enrollment.
    issue("client", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
    return files


def grpcurl(target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GRPCURL), *flags, target, "coursesignup.enrollment.v1.EnrollmentService/ListCourses"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_tls_serves_grpcurl_with_the_ca_and_refuses_plaintext(kinesis_env, tmp_path, pki):
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}", seed_demo_catalogue=True,
                                  tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"]) as target:
        answer = grpcurl(target, "-cacert", pki["ca"])
        assert answer.returncode == 0, answer.stderr
        assert "art110" in answer.stdout
        assert grpcurl(target, "-plaintext").returncode != 0
        assert grpcurl(target).returncode != 0  # the system's CAs do not know this one


def test_mutual_tls_needs_a_client_certificate_and_registration_presents_one(kinesis_env, tmp_path, pki):
    server_tls = {"tls_cert_file": pki["server_cert"], "tls_key_file": pki["server_key"],
                  "tls_client_ca_file": pki["ca"]}
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}", seed_demo_catalogue=True,
                                  **server_tls) as target:
        assert grpcurl(target, "-cacert", pki["ca"]).returncode != 0  # no client certificate
        answer = grpcurl(target, "-cacert", pki["ca"], "-cert", pki["client_cert"], "-key", pki["client_key"])
        assert answer.returncode == 0, answer.stderr

        # Registration trusts the CA and presents its certificate to enrollment; its own port
        # serves TLS with the same files.
        port = helpers.free_port()
        settings = RegistrationSettings(registration_port=port, enrollment_target=target, kinesis_shard_count=1,
                                        tls_ca_file=pki["ca"], tls_cert_file=pki["client_cert"],
                                        tls_key_file=pki["client_key"])
        with helpers.serve_in_thread(registration_hooks(settings)):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pathlib.Path(pki["ca"]).read_bytes(),
                private_key=pathlib.Path(pki["client_key"]).read_bytes(),
                certificate_chain=pathlib.Path(pki["client_cert"]).read_bytes())
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                stub = registration_pb2_grpc.RegistrationServiceStub(channel)
                # The course check reads the catalogue from enrollment, over mutual TLS.
                reply = stub.Register(registration_pb2.RegisterRequest(
                    name="Ada", email="ada@example.com", course_id="art110",
                    birth_date=date_pb2.Date(year=1990, month=12, day=10)), timeout=20)
                assert reply.status == registration_pb2.REGISTRATION_STATUS_PENDING
        with grpc.secure_channel(target, credentials) as channel:
            course = enrollment_pb2_grpc.EnrollmentServiceStub(channel).GetCourse(
                pb.GetCourseRequest(course_id="art110"), timeout=10)
            assert course.course_id == "art110"


def test_the_coursesignup_command_trusts_its_ca_file_and_presents_its_certificate(kinesis_env, tmp_path, pki):
    server_tls = {"tls_cert_file": pki["server_cert"], "tls_key_file": pki["server_key"],
                  "tls_client_ca_file": pki["ca"]}
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}", seed_demo_catalogue=True,
                                  **server_tls) as target:
        def coursesignup(*flags: str) -> subprocess.CompletedProcess[str]:
            command = [str(pathlib.Path(sys.executable).parent / "coursesignup"), "--enrollment", target, *flags]
            return subprocess.run([*command, "catalogue", "list"], capture_output=True, text=True, timeout=60,
                                  cwd=tmp_path)
        listed = coursesignup("--ca-file", pki["ca"], "--cert-file", pki["client_cert"],
                              "--key-file", pki["client_key"])
        assert listed.returncode == 0, listed.stderr
        assert "art110" in listed.stdout
        refused = coursesignup("--ca-file", pki["ca"])  # no client certificate
        assert refused.returncode == 1 and "error: UNAVAILABLE" in refused.stderr, refused.stderr
