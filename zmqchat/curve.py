"""CURVE on the cluster's links: ZeroMQ's own encryption and authentication (zmq.auth).

Every part is given one keys folder with `--curve DIR`:

- the broker uses DIR/broker.key_secret as its key pair and accepts only the workers and
  frontends whose public keys (*.key) are in DIR;
- a worker, an API frontend or `zmqchat status` uses DIR/NAME.key_secret as its key pair
  (NAME: worker, api, status unless --curve-name says otherwise) and DIR/broker.key to know
  the broker; everything it sends is encrypted, and it talks to nobody but that broker.

`zmqchat keys NAME --dir DIR` writes NAME.key and NAME.key_secret. Without --curve links are
plaintext, the right default on loopback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("zmqchat.curve")

BROKER = "broker"


@dataclass(frozen=True)
class Curve:
    folder: Path
    name: str  # whose key pair in `folder` this part uses

    def key_pair(self) -> tuple[bytes, bytes]:
        return _load(self.folder / f"{self.name}.key_secret", secret=True)


def from_folder(folder: Path | None, name: str) -> Curve | None:
    """CURVE with `name`'s keys in `folder`, or None (plaintext) when there is no folder."""
    return Curve(folder, name) if folder else None


def describe(curve: Curve | None) -> str:
    """For a client's start-up log line."""
    return f"CURVE on, keys of {curve.name} in {curve.folder}" if curve else "CURVE off"


def create_keys(name: str, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    return Path(public), Path(secret)


def ensure_keys(folder: Path, names: list[str]) -> None:
    """Create the key pairs among `names` that `folder` does not have yet."""
    for name in names:
        if not (folder / f"{name}.key_secret").exists():
            create_keys(name, folder)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes]:
    if not path.exists():
        raise FileNotFoundError(f"CURVE key {path} is missing: create it with `zmqchat keys {path.stem}`")
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret_key


def secure_server(context: zmq.Context, sockets: list[zmq.Socket], curve: Curve | None) -> ThreadAuthenticator | None:
    """Make `sockets` (not yet bound) CURVE servers that admit only the folder's public keys."""
    if curve is None:
        log.info("CURVE off: links are plaintext and any peer may connect")
        return None
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(curve.folder))
    public, secret = curve.key_pair()
    for socket in sockets:
        socket.curve_publickey = public
        socket.curve_secretkey = secret
        socket.curve_server = True
    log.info("CURVE on: encrypted links; admitting the public keys in %s", curve.folder)
    return authenticator


def secure_client(socket: zmq.Socket, curve: Curve | None) -> None:
    """Make `socket` (not yet connected) a CURVE client of the folder's broker."""
    if curve is None:
        return
    socket.curve_publickey, socket.curve_secretkey = curve.key_pair()
    socket.curve_serverkey = _load(curve.folder / f"{BROKER}.key", secret=False)[0]
