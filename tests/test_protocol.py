"""The wire: every message round-trips; every missing, mistyped or out-of-range field, and any
other body at all, is a ProtocolError and nothing else."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqchat import protocol as p

LOGPROB = p.TokenLogprob("Paris", b"Paris", -0.01, [p.Alternative("Paris", b"Paris", -0.01),
                                                     p.Alternative("bytes:\\xe5", b"\xe5", -5.0)], 12)
PROMPT = [p.PromptToken(791, "The", b"The", 0),
          p.PromptToken(6, " cat", b" cat", 3, -7.25, 40, [p.Alternative(" first", b" first", -2.5, 1176)])]
EXAMPLES = [
    p.Ready(worker_id="w1", models=["m"], slots=4, host="h", device="cpu", pid=1),
    p.Ready(worker_id="w2", models=["m"], slots=4, tasks=["embed"]),
    p.Heartbeat(),
    p.Heartbeat(broker_id="b1"),
    p.Submit(id="r1", model="m", timeout=30.0, messages=[p.ChatMessage("user", "hi")],
             params=p.SamplingParams(max_tokens=5, temperature=0.0, stop=("\n",), seed=-(2**63), logprobs=2)),
    p.Submit(id="r2", model="m", timeout=1.0, prompt=[1, 2, 3], params=p.SamplingParams(echo=True)),
    p.Submit(id="r3", model="m", timeout=1.0, prompt="Tea is"),
    p.Submit(id="r4", model="m", timeout=1.0, prompt="Tea is",
             params=p.SamplingParams(max_tokens=0, echo=True, logprobs=1, prompt_logprobs=3)),
    p.Submit(id="r5", model="m", timeout=1.0, embed=p.Embed(["Tea is", [1, 2]], dimensions=64)),
    p.Submit(id="r6", model="m", timeout=1.0, tools=(p.Function("get_weather", "Weather", '{"type": "object"}'),),
             messages=[p.ChatMessage("user", "Paris?"),
                       p.ChatMessage("assistant", "", tool_calls=(p.ToolCall("c1", "get_weather", "{}"),)),
                       p.ChatMessage("tool", "sunny", tool_call_id="c1")]),
    p.Submit(id="r7", model="m", timeout=1.0, prompt="JSON:", params=p.SamplingParams(
        constraint=p.Constraint("json_schema", '{"type": "object"}'))),
    p.Cancel(ids=["r1", "r2"]),
    p.Step([p.Output("r1", "Hel", 1, usage=p.Usage(7, 1)), p.Output("r2", "巴黎 🇫🇷", 2, [LOGPROB]),
            p.Output("r3", "", finish="stop", usage=p.Usage(12, 3)),
            p.Output("r4", "The cat", 0, [], "length", p.Usage(2, 0), PROMPT),
            p.Output("r5", finish="stop", usage=p.Usage(3, 0), embeddings=[b"\x00\x00\x80?", b"\x00\x00\x80\xbf"])]),
    p.Error("r1", p.ErrorCode.MODEL_NOT_FOUND, "no such model"),
    p.Error("r5", p.ErrorCode.INVALID_REQUEST, "too many dimensions", "dimensions"),
    p.Disconnect("shutdown"),
    p.Disconnect("drain", drain=True),
    p.Status(token="t"),
    p.Status(token="t", report=p.StatusReport("random", [p.WorkerStatus(
        "w1", ["m"], "h", "cpu", 4, 3, 10, 9, False, 0.5)], {"m": p.ModelStatus(1, 4, 3, 0)})),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    frames = p.encode(message)
    assert frames[0] == p.PROTOCOL and p.COMMANDS[frames[1]] is type(message)
    assert p.decode(frames) == message


def test_every_message_type_has_an_example_and_its_own_command():
    assert {type(m) for m in EXAMPLES} == set(p.COMMANDS.values())
    assert len(p.COMMANDS) == len(set(p.COMMANDS.values()))


def frames_of(kind: type, body) -> list[bytes]:
    command = next(c for c, k in p.COMMANDS.items() if k is kind)
    return [p.PROTOCOL, command, msgspec.msgpack.encode(body)]


def as_builtins(message) -> dict:
    return msgspec.to_builtins(message)


MAP_MESSAGES = [m for m in EXAMPLES if isinstance(m, p.Wire) and msgspec.structs.fields(m)]


@pytest.mark.parametrize("message", MAP_MESSAGES, ids=lambda m: type(m).__name__)
def test_a_missing_required_field_is_refused(message):
    required = [f.encode_name for f in msgspec.structs.fields(message) if f.required]
    for name in required:
        body = as_builtins(message)
        del body[name]
        with pytest.raises(p.ProtocolError, match=f"missing required field `{name}`"):
            p.decode(frames_of(type(message), body))


@pytest.mark.parametrize("message", MAP_MESSAGES, ids=lambda m: type(m).__name__)
def test_a_mistyped_field_is_refused(message):
    for field in msgspec.structs.fields(message):
        body = {**as_builtins(message), field.encode_name: {"not": ["the", "right", "type"]}}
        with pytest.raises(p.ProtocolError, match=f"`\\$.{field.encode_name}`"):
            p.decode(frames_of(type(message), body))


def test_an_unknown_field_is_refused():
    with pytest.raises(p.ProtocolError, match="unknown field `colour`"):
        p.decode(frames_of(p.Cancel, {"ids": [], "colour": "red"}))


SUBMIT = as_builtins(next(m for m in EXAMPLES if isinstance(m, p.Submit)))


@pytest.mark.parametrize("change,where", [
    ({"timeout": float("nan")}, "timeout"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": p.MAX_TIMEOUT + 1}, "timeout"),
    ({"id": ""}, "id"),
    ({"model": "m" * (p.MAX_NAME + 1)}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": None}, "one of messages, a prompt or inputs"),
    ({"prompt": "both"}, "one of messages, a prompt or inputs"),
    ({"embed": {"inputs": ["both"]}}, "one of messages, a prompt or inputs"),
    ({"messages": None, "embed": {"inputs": []}}, "embed.inputs"),
    ({"messages": None, "embed": {"inputs": [""]}}, r"embed.inputs\[0\]"),
    ({"messages": None, "embed": {"inputs": [[]]}}, r"embed.inputs\[0\]"),
    ({"messages": None, "embed": {"inputs": ["x"] * (p.MAX_EMBED_INPUTS + 1)}}, "embed.inputs"),
    ({"messages": None, "embed": {"inputs": ["x"], "dimensions": 0}}, "embed.dimensions"),
    ({"params": {"temperature": 2.5}}, "params.temperature"),
    ({"params": {"temperature": float("nan")}}, "params.temperature"),
    ({"params": {"top_p": 0.0}}, "params.top_p"),
    ({"params": {"max_tokens": -1}}, "params.max_tokens"),
    ({"params": {"max_tokens": 0}}, "only allowed with echo"),
    ({"params": {"prompt_logprobs": p.MAX_TOP_LOGPROBS + 1}}, "params.prompt_logprobs"),
    ({"params": {"prompt_logprobs": -1}}, "params.prompt_logprobs"),
    ({"params": {"presence_penalty": -2.5}}, "params.presence_penalty"),
    ({"params": {"seed": 2**63}}, "params.seed"),
    ({"params": {"stop": ["x"] * (p.MAX_STOP_STRINGS + 1)}}, "params.stop"),
    ({"params": {"stop": [""]}}, "params.stop"),
    ({"params": {"logprobs": p.MAX_TOP_LOGPROBS + 1}}, "params.logprobs"),
    ({"params": {"top_k": -1}}, "params.top_k"),
    ({"params": {"constraint": {"kind": "xml", "source": "<a/>"}}}, "params.constraint.kind"),
    ({"params": {"constraint": {"kind": "regex", "source": ""}}}, "params.constraint.source"),
    ({"params": {"constraint": {"kind": "lark", "source": "x" * (p.MAX_GRAMMAR + 1)}}}, "params.constraint.source"),
    ({"params": {"constraint": {"kind": "regex"}}}, "params.constraint"),
    ({"tools": [{"name": "f"}] * (p.MAX_TOOLS + 1)}, "tools"),
    ({"tools": [{"name": ""}]}, "tools"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": "f"}]}]}, "arguments"),
])
def test_a_submit_out_of_range_is_refused(change, where):
    with pytest.raises(p.ProtocolError, match=where):
        p.decode(frames_of(p.Submit, {**SUBMIT, **change}))


@pytest.mark.parametrize("body,where", [
    ({"worker_id": "w", "models": [], "slots": 1}, "models"),
    ({"worker_id": "w", "models": ["m"] * (p.MAX_MODELS + 1), "slots": 1}, "models"),
    ({"worker_id": "w", "models": ["m"], "slots": 0}, "slots"),
    ({"worker_id": "w", "models": ["m"], "slots": p.MAX_SLOTS + 1}, "slots"),
    ({"worker_id": "w", "models": ["x" * (p.MAX_NAME + 1)], "slots": 1}, "models"),
    ({"worker_id": "w", "models": ["m"], "slots": 1, "tasks": []}, "tasks"),
    ({"worker_id": "w", "models": ["m"], "slots": 1, "tasks": ["train"]}, "tasks"),
])
def test_a_ready_beyond_the_caps_is_refused(body, where):
    with pytest.raises(p.ProtocolError, match=where):
        p.decode(frames_of(p.Ready, body))


@pytest.mark.parametrize("outputs,reason", [
    ([[]], "at least length 1"),
    ([["r1", "x", 1, None, "stop"]], "usage"),
    ([["r1", "x", 1, None, "exploded", [1, 1]]], "Invalid enum value .exploded."),
    ([["r1", "x", -1]], r"outputs\[0\]\[2\]"),  # a negative token count
    ([["r1", "x", [LOGPROB]]], r"outputs\[0\]\[2\]"),  # ZMQCHAT/2's layout: logprobs where tokens are
    ([["r1", "x", 0, None, None, None, [[1, "a", b"a"]]]], "at least length 4"),  # a prompt token without its offset
    ([["r1", "x", 0, None, None, None, [[1, "a", b"a", 0, -1.0, -2]]]],
     r"at `\$.outputs\[0\]\[6\]\[0\]\[5\]`"),  # a negative rank
    ([["r1", "x", 0, None, None, None, [[-1, "a", b"a", 0]]]],
     r"at `\$.outputs\[0\]\[6\]\[0\]\[0\]`"),  # a negative token id
    ([["r1", "", 0, None, None, None, None, [b"abc"]]], "multiple of 4 bytes"),  # not float32 values
    ([], "length >= 1"),
])
def test_a_malformed_step_is_refused(outputs, reason):
    with pytest.raises(p.ProtocolError, match=reason):
        p.decode(frames_of(p.Step, {"outputs": outputs}))


def test_an_error_carries_a_code_not_a_status():
    with pytest.raises(p.ProtocolError, match="code"):
        p.decode(frames_of(p.Error, {"id": "r1", "code": 404, "message": "x"}))


@pytest.mark.parametrize("frames,reason", [
    ([p.PROTOCOL, b"\x02"], "expected 3 frames"),
    ([b"ZMQCHAT/2", b"\x02", msgspec.msgpack.encode({})], "version"),
    ([b"HTTP/1.1", b"\x02", msgspec.msgpack.encode({})], "version"),
    ([p.PROTOCOL, b"\x7f", msgspec.msgpack.encode({})], "unknown command"),
    ([p.PROTOCOL, b"\x03", b"\xc1garbage"], "Submit"),
    ([p.PROTOCOL, b"\x03", msgspec.msgpack.encode([1, 2])], "Expected `object`"),
    ([p.PROTOCOL, b"\x03", b"\x81"], "truncated"),
    # a key of invalid UTF-8 (msgspec's message spells it in either case, by version)
    ([p.PROTOCOL, b"\x01", b"\x81\xa9\x00\x00\x00\x00\x00\x00\x00\x00\x80"], "(?i)utf-8"),
])
def test_bad_frames_are_refused_with_a_reason(frames, reason):
    with pytest.raises(p.ProtocolError, match=reason):
        p.decode(frames)


def test_text_utf8_cannot_carry_is_refused_when_encoding():
    with pytest.raises(p.ProtocolError, match="not valid Unicode"):
        p.encode(p.Submit(id="r1", model="m", timeout=1.0, prompt="\ud800 x"))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)


def near_valid_bodies() -> st.SearchStrategy:
    """Real messages with one field replaced by anything: closer to the checks than noise."""
    def mutate(message, data):
        body = as_builtins(message)
        if isinstance(body, dict) and body:
            body[data.draw(st.sampled_from(sorted(body)))] = data.draw(msgpack_values)
        return type(message), body
    return st.builds(mutate, st.sampled_from(EXAMPLES), st.data())


@settings(max_examples=500, deadline=None)
@given(command=st.sampled_from(sorted(p.COMMANDS)) | st.binary(max_size=2), body=msgpack_values,
       raw=st.binary(max_size=64), near=near_valid_bodies())
def test_decode_of_anything_is_a_message_or_a_protocol_error(command, body, raw, near):
    kind, near_body = near
    for frames in ([p.PROTOCOL, command, msgspec.msgpack.encode(body)], [p.PROTOCOL, command, raw],
                   frames_of(kind, near_body)):
        try:
            message = p.decode(frames)
        except p.ProtocolError:
            continue
        assert isinstance(message, tuple(p.COMMANDS.values()))
        assert p.decode(p.encode(message)) == message
