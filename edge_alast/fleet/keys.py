"""A fleet's keys (``edge-alast fleet keys DIR``): a certificate authority, the SuperLink's TLS certificate signed by
it, and one SuperNode key pair per node for Flower's node authentication. Written with the ``cryptography``
package (a dependency of flwr).

Folder::

    ca.pem, ca.key                  the CA (ca.key signs server certificates; keep it off the server if you can)
    server.pem, server.key          the SuperLink's certificate (SAN: 127.0.0.1, ::1, localhost and every --host)
    nodes/<name>, nodes/<name>.pub  a SuperNode's EC P-384 key pair in OpenSSH format (Flower's node auth format)

How Flower uses them (1.41): ``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile
server.key --enable-supernode-auth``; ``flwr supernode register nodes/<name>.pub CONNECTION`` registers a node's
public key; ``flower-supernode --root-certificates ca.pem --auth-supernode-private-key nodes/<name>``. Private keys
are written with mode 0600. Files that exist are kept (a CA that nodes already trust is never replaced); the
server certificate is reissued from the same CA when it lacks a requested host.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
NODES_DIR = "nodes"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
CA_DAYS, SERVER_DAYS = 3650, 825  # 825 days: the longest server certificate common TLS clients accept
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class FleetKeys:
    """Paths of a fleet's keys (see module docstring); ``written`` names the files this call created."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    nodes: dict[str, tuple[Path, Path]]  # name -> (private key, public key)
    hosts: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    def node_key(self, name: str) -> tuple[Path, Path]:
        if name not in self.nodes:
            raise ConfigError(f"keys: no key pair for node {name!r} in {self.folder / NODES_DIR} "
                              f"(edge-alast fleet keys {self.folder} --node {name})")
        return self.nodes[name]


def write_keys(folder: str | os.PathLike, nodes: list[str] | int = 0, hosts: list[str] | tuple[str, ...] = ()
               ) -> FleetKeys:
    """Write what is missing of the CA, the server certificate (for ``hosts`` and loopback) and the node key pairs.

    Args:
        nodes: Node names (``node0`` ...), or how many (``node0`` to ``node<n-1>``).
        hosts: Names or IP addresses the SuperLink is reached at, besides loopback.
    """
    folder = Path(folder)
    names = [f"node{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
    for name in names:
        if not _NAME_RE.match(name):
            raise ConfigError(f"--node: {name!r} is not a file-safe name (letters, digits, '_', '.', '-')")
    want_hosts = list(dict.fromkeys([*LOOPBACK_HOSTS, *(h.strip() for h in hosts if h.strip())]))
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    if ca_cert_path.exists() != ca_key_path.exists():
        raise ConfigError(f"keys: {folder} holds only one of {CA_CERT} and {CA_KEY}; restore the other or use an "
                          "empty folder (a new CA means new certificates everywhere)")
    if not ca_cert_path.exists():
        ca_key, ca_cert = _new_ca()
        _write_private(ca_key_path, _pem_private(ca_key))
        ca_cert_path.write_bytes(_pem_cert(ca_cert))
        written += [CA_CERT, CA_KEY]
    ca_key, ca_cert = _load_private_pem(ca_key_path), _load_cert(ca_cert_path)

    server_cert_path, server_key_path = folder / SERVER_CERT, folder / SERVER_KEY
    if not (server_cert_path.exists() and server_key_path.exists()
            and set(want_hosts) <= set(certificate_hosts(server_cert_path))
            and _issued_by(_load_cert(server_cert_path), ca_cert)):
        key, cert = _new_server_cert(ca_key, ca_cert, want_hosts)
        _write_private(server_key_path, _pem_private(key))
        server_cert_path.write_bytes(_pem_cert(cert))
        written += [SERVER_CERT, SERVER_KEY]

    (folder / NODES_DIR).mkdir(exist_ok=True)
    for name in names:
        private, public = folder / NODES_DIR / name, folder / NODES_DIR / f"{name}.pub"
        if private.exists() and public.exists():
            continue
        private_bytes, public_bytes = _new_node_key(name)
        _write_private(private, private_bytes)
        public.write_bytes(public_bytes)
        written += [f"{NODES_DIR}/{name}", f"{NODES_DIR}/{name}.pub"]
    keys = load_keys(folder)
    keys.written = written
    return keys


def keys_layout(folder: str | os.PathLike, nodes: list[str]) -> FleetKeys:
    """Where :func:`write_keys` puts the files of ``folder`` (which need not exist yet: a recipe names them)."""
    folder = Path(folder)
    return FleetKeys(folder=folder, ca_cert=folder / CA_CERT, server_cert=folder / SERVER_CERT,
                     server_key=folder / SERVER_KEY,
                     nodes={n: (folder / NODES_DIR / n, folder / NODES_DIR / f"{n}.pub") for n in nodes})


def load_keys(folder: str | os.PathLike) -> FleetKeys:
    """The keys in ``folder`` (as :func:`write_keys` leaves it); ConfigError naming what is missing."""
    folder = Path(folder)
    missing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"keys: {folder} lacks {', '.join(missing)} (edge-alast fleet keys {folder})")
    nodes = {}
    for pub in sorted((folder / NODES_DIR).glob("*.pub")):
        private = pub.with_suffix("")
        if private.is_file():
            nodes[private.name] = (private, pub)
    return FleetKeys(folder=folder, ca_cert=folder / CA_CERT, server_cert=folder / SERVER_CERT,
                     server_key=folder / SERVER_KEY, nodes=nodes, hosts=certificate_hosts(folder / SERVER_CERT))


def certificate_hosts(path: str | os.PathLike) -> list[str]:
    """The DNS names and IP addresses in a certificate's subject alternative names."""
    from cryptography import x509

    cert = _load_cert(Path(path))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]


def is_loopback(address: str) -> bool:
    """Whether ``address`` (``host``, ``host:port`` or ``[v6]:port``) is this machine only."""
    host = address.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- cryptography
def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-alast fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_ca():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("edge-alast fleet CA")
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _new_server_cert(ca_key, ca_cert, hosts: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[-1] if hosts else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def _new_node_key(name: str) -> tuple[bytes, bytes]:
    """An EC P-384 key pair in OpenSSH format (``flower-supernode --auth-supernode-private-key``, ``flwr supernode
    register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" edge-alast-{name}\n".encode()


def _issued_by(cert, ca_cert) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not this CA's": reissue
        return False


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _load_private_pem(path: Path):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"keys: {path} is not an unencrypted PEM private key: {e}") from e


def _load_cert(path: Path):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as e:
        raise ConfigError(f"keys: {path} is not a PEM certificate: {e}") from e


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never briefly world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
