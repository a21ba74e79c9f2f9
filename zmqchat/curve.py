"""CURVE on the cluster's links (ZeroMQ's encryption and authentication, zmq.auth), and who
the broker lets in.

Every part is given one keys folder with `--curve DIR`:

- the broker uses DIR/broker.key_secret as its key pair. It admits on its worker socket only
  the public keys in DIR/workers/, and on its frontend socket only those in DIR/frontends/
  (ZAP tells the two apart by the socket's domain), so a frontend's key cannot join as a
  worker nor a worker's ask for STATUS. It reads both folders again when they change, and
  on SIGHUP: adding or revoking a key needs no restart.
- a worker, an API frontend or `zmqchat status` uses DIR/NAME.key_secret as its key pair
  (NAME: worker, api, status unless --curve-name says otherwise) and DIR/broker.key to know
  the broker; everything it sends is encrypted, and it talks to nobody but that broker.

`zmqchat keys NAME --dir DIR [--role worker|frontend]` writes NAME.key and NAME.key_secret
(readable by its owner only, in a folder only its owner may enter, as ssh keeps its keys), and
with a role admits the public key in DIR's role folder. A secret key that others can read is
refused. Without --curve links are plaintext: the right default on loopback only, which is
why a part that listens beyond loopback without CURVE needs --insecure (`check_exposure`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zmqchat.config import is_loopback

log = logging.getLogger("zmqchat.curve")

BROKER = "broker"
ROLES = {"worker": "workers", "frontend": "frontends"}  # a role -> the broker's folder of its admitted keys


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


def create_keys(name: str, folder: Path, role: str | None = None) -> tuple[Path, Path]:
    """A key pair for `name` in `folder`; with a role, its public key admitted for that role."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    public, secret = (Path(path) for path in zmq.auth.create_certificates(str(folder), name))
    secret.chmod(0o600)
    if role:
        admit(public, folder, role)
    return public, secret


def admit(public: Path, folder: Path, role: str) -> None:
    """Let the holder of `public` join the broker whose folder is `folder` as a `role`."""
    admitted = folder / ROLES[role]
    admitted.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(public, admitted / public.name)


def ensure_keys(folder: Path, roles: dict[str, str | None]) -> None:
    """Create the key pairs of `roles` (name -> role, None for the broker) that `folder` lacks."""
    for name, role in roles.items():
        if not (folder / f"{name}.key_secret").exists():
            create_keys(name, folder, role)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes]:
    if not path.exists():
        raise FileNotFoundError(f"CURVE key {path} is missing: create it with `zmqchat keys {path.stem}`")
    if secret and path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} can be read by others than its owner: `chmod 600 {path}` (and keep it secret)")
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret_key


class Gatekeeper:
    """The broker's CURVE: its key pair on both sockets, and the keys each admits, kept in step
    with the folder."""

    def __init__(self, context: zmq.Context, frontend: zmq.Socket, backend: zmq.Socket, curve: Curve):
        self.folder = curve.folder
        missing = [self.folder / role for role in ROLES.values() if not (self.folder / role).is_dir()]
        if len(missing) == len(ROLES):
            raise FileNotFoundError(f"{self.folder} has no {' or '.join(ROLES.values())} folder: put the public "
                                    f"keys (*.key) of the workers and frontends the broker admits there "
                                    f"(`zmqchat keys NAME --dir {self.folder} --role worker|frontend`)")
        for folder in missing:  # a role none of whose keys are admitted yet
            folder.mkdir(mode=0o700)
        public, secret = curve.key_pair()
        for socket, role in ((frontend, "frontends"), (backend, "workers")):
            socket.curve_publickey, socket.curve_secretkey, socket.curve_server = public, secret, True
            socket.zap_domain = role.encode()
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.seen: tuple = ()
        self.admitted: dict[str, set[str]] = {}  # role folder -> the public keys (Z85) it admits
        self.reload()
        log.info("CURVE on: encrypted links; admitting the workers' keys in %s and the frontends' in %s",
                 self.folder / "workers", self.folder / "frontends")

    def _signature(self) -> tuple:
        """What the admitted keys are, cheaply: each key file's name, size and time."""
        files = sorted(path for role in ROLES.values() for path in (self.folder / role).glob("*.key"))
        return tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files)

    def reload(self, force: bool = False) -> bool:
        """Read the admitted keys again if they changed (or `force`); True if it did."""
        signature = self._signature()
        if signature == self.seen and not force:
            return False
        for role in ROLES.values():
            location = str(self.folder / role)
            self.admitted[role] = {key.decode() for key in zmq.auth.load_certificates(location)}
            self.authenticator.configure_curve(domain=role, location=location)
        if self.seen:
            log.info("CURVE: read the admitted keys again: %d", len(signature))
        self.seen = signature
        return True

    def stop(self) -> None:
        self.authenticator.stop()


def secure_client(socket: zmq.Socket, curve: Curve | None) -> None:
    """Make `socket` (not yet connected) a CURVE client of the folder's broker."""
    if curve is None:
        return
    socket.curve_publickey, socket.curve_secretkey = curve.key_pair()
    socket.curve_serverkey = _load(curve.folder / f"{BROKER}.key", secret=False)[0]


def check_exposure(what: str, hosts: list[str], protected: bool, insecure: bool) -> None:
    """Refuse to listen beyond loopback without protection, unless told --insecure (as Redis'
    protected mode does); then say what is exposed."""
    exposed = [host for host in hosts if not is_loopback(host)]
    if not exposed or protected:
        return
    if not insecure:
        raise SystemExit(f"refusing to expose {what} on {', '.join(exposed)} without protection: "
                         f"use CURVE (--curve), or pass --insecure to accept the risk")
    log.warning("INSECURE: %s listens on %s with no protection: anyone who can reach it may use it",
                what, ", ".join(exposed))
