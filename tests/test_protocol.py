import msgpack
import pytest

from zmqchat import protocol as p


@pytest.mark.parametrize("command,body", [
    (p.READY, {"worker_id": "w1", "models": ["m"], "slots": 4, "host": "h", "device": "cpu", "pid": 1}),
    (p.HEARTBEAT, {}),
    (p.SUBMIT, {"id": "r1", "model": "m", "timeout": 30.0, "messages": [{"role": "user", "content": "hi"}],
                "params": {"max_tokens": 5, "stop": ["\n"]}}),
    (p.CANCEL, {"ids": ["r1", "r2"]}),
    (p.CHUNK, [["r1", "Hel"], ["r2", "巴黎 🇫🇷"]]),
    (p.DONE, [["r1", "lo", "stop", 12, 3]]),
    (p.ERROR, p.error_body("r1", 404, "model_not_found", "no such model")),
    (p.DISCONNECT, {"reason": "shutdown"}),
    (p.STATUS, {"token": "t"}),
])
def test_every_message_round_trips(command, body):
    frames = p.encode(command, body)
    assert frames[0] == p.PROTOCOL and frames[1] == command
    assert p.decode(frames) == (command, body)


@pytest.mark.parametrize("frames,reason", [
    ([p.PROTOCOL, p.HEARTBEAT], "expected 3 frames"),
    ([b"ZMQCHAT/0", p.HEARTBEAT, msgpack.packb({})], "version"),
    ([b"HTTP/1.1", p.HEARTBEAT, msgpack.packb({})], "version"),
    ([p.PROTOCOL, b"\x7f", msgpack.packb({})], "unknown command"),
    ([p.PROTOCOL, p.SUBMIT, b"\xc1garbage"], "not msgpack"),
    ([p.PROTOCOL, p.SUBMIT, msgpack.packb([1, 2])], "must be a dict"),
    ([p.PROTOCOL, p.CHUNK, msgpack.packb({"a": 1})], "must be a list"),
    ([p.PROTOCOL, p.SUBMIT, msgpack.packb({1: 2})[:-1]], "not msgpack"),
])
def test_bad_frames_are_refused_with_a_reason(frames, reason):
    with pytest.raises(p.ProtocolError, match=reason):
        p.decode(frames)


def test_command_bytes_are_unique():
    assert len(set(p.COMMAND_NAMES)) == len(p.COMMAND_NAMES) == 9
