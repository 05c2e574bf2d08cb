"""A throw-away CA and server certificate for 127.0.0.1 (openssl), for TLS tests.

The directory holds ca-cert.pem, server-cert.pem and server-key.pem: the layout QEMU's
tls-creds-x509 and libnbd's set_tls_certificates both read."""

from __future__ import annotations

import subprocess
from pathlib import Path

_EXT = """[srv]
basicConstraints=critical,CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
[ca]
basicConstraints=critical,CA:TRUE
keyUsage=keyCertSign,cRLSign
"""


def make_certs(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ext = d / "ext.cnf"
    ext.write_text(_EXT)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca-key.pem"),
            "-out", str(d / "ca-cert.pem"), "-subj", "/CN=snapimg test CA", "-days", "2",
            "-extensions", "ca", "-config", str(ext))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server-key.pem"),
            "-out", str(d / "server.csr"), "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca-cert.pem"),
            "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-out",
            str(d / "server-cert.pem"), "-days", "2", "-extfile", str(ext),
            "-extensions", "srv")  # fmt: skip
    return d
