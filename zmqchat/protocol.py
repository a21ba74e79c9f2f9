"""The zmqchat wire protocol: every message between frontends, broker and workers.

A message is three ZeroMQ frames, preceded on a ROUTER socket by the peer's identity:

    [PROTOCOL] [command: 1 byte] [body: msgpack]

PROTOCOL names the protocol and its version; a peer speaking another version is refused.
Nothing outside this module builds or parses frames. `encode()` builds them, `decode()`
checks them and raises ProtocolError for anything malformed, which the receiver logs and drops.

Bodies, by command (direction: F frontend, B broker, W worker):

  READY       W->B  {"worker_id", "models": [str], "slots": int, "host", "device", "pid"}
  HEARTBEAT   both  {}          W<->B, and F->B, which B answers with {"broker_id"} (new after a restart);
                                a frontend silent for long has its jobs cancelled
  SUBMIT      F->B->W  {"id", "model", "timeout": seconds, "params": {...}, and either "messages": [...]
                       (a chat) or "prompt": text or [token id, ...] (a completion)}; one per choice
  CANCEL      F->B->W  {"ids": [str]}
  CHUNK       W->B->F  [[id, text], ...]                 new text of each sequence, one engine step
  DONE        W->B->F  [[id, text, finish_reason, prompt_tokens, completion_tokens], ...]
                       a job whose params ask for logprobs has one more element in each CHUNK and
                       DONE entry: [[token, bytes, logprob, [[token, bytes, logprob], ...top], text offset], ...]
  ERROR       W/B->F   {"id", "status": http status, "type", "message"}
  DISCONNECT  W->B     {"reason", "drain": bool}: with drain, the worker takes no new jobs and
                       finishes those it has; without, it leaves now (its jobs are requeued or failed)
              B->W     {"reason"}: the broker does not know this worker; it must send READY again
  STATUS      F->B     {"token"};  B->F  {"token", "policy", "workers": [...], "models": {...}}

CHUNK and DONE carry lists so that one engine step, over many sequences, is one message.
"""

from __future__ import annotations

import msgpack

PROTOCOL = b"ZMQCHAT/1"

READY = b"\x01"
HEARTBEAT = b"\x02"
SUBMIT = b"\x03"
CANCEL = b"\x04"
CHUNK = b"\x05"
DONE = b"\x06"
ERROR = b"\x07"
DISCONNECT = b"\x08"
STATUS = b"\x09"

COMMAND_NAMES = {
    READY: "READY", HEARTBEAT: "HEARTBEAT", SUBMIT: "SUBMIT", CANCEL: "CANCEL",
    CHUNK: "CHUNK", DONE: "DONE", ERROR: "ERROR", DISCONNECT: "DISCONNECT", STATUS: "STATUS",
}

# The body of each command must be a map or a list, as documented above.
_LIST_BODIES = {CHUNK, DONE}

# Largest body we accept; a bigger frame is a broken or hostile peer.
MAX_BODY_BYTES = 64 * 1024 * 1024


class ProtocolError(ValueError):
    """A frame sequence that is not a valid zmqchat message."""


def encode(command: bytes, body) -> list[bytes]:
    """Frames for one message (without the ROUTER identity)."""
    return [PROTOCOL, command, msgpack.packb(body, use_bin_type=True)]


def decode(frames: list[bytes]):
    """(command, body) of a message's frames, the ROUTER identity already removed."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    tag, command, raw = frames
    if tag != PROTOCOL:
        raise ProtocolError(f"unknown protocol or version {bytes(tag[:32])!r}, expected {PROTOCOL!r}")
    if command not in COMMAND_NAMES:
        raise ProtocolError(f"unknown command {bytes(command[:8])!r}")
    if len(raw) > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {len(raw)} bytes is over the limit")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for bad input
        raise ProtocolError(f"{COMMAND_NAMES[command]} body is not msgpack: {exc}") from None
    expected = list if command in _LIST_BODIES else dict
    if not isinstance(body, expected):
        raise ProtocolError(f"{COMMAND_NAMES[command]} body must be a {expected.__name__}")
    return command, body


def error_body(request_id: str, status: int, type_: str, message: str) -> dict:
    return {"id": request_id, "status": status, "type": type_, "message": message}
