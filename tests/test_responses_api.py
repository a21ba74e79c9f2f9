"""OpenAI's Responses API (/v1/responses) through the official `openai` client, over a real broker,
API and fake-engine worker, and its response store as a pure object. The fake engine says the
last user message back and counts every word of every message as a prompt token, so a reply's
input_tokens show what the worker received."""

from __future__ import annotations

import openai
import pytest
from conftest import Cluster, assert_each_refused_naming_its_param, wait_for

from zmqchat.api.responses_api import ResponseStore, StoredResponse
from zmqchat.api.schemas import ChatMessage

WORDS = "alpha beta gamma delta epsilon"


@pytest.fixture(scope="module")
def cluster(module_cluster):
    module_cluster.broker()
    module_cluster.worker("--fake-delay", "0.005")
    module_cluster.api("--response-store", "8")
    return module_cluster


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def respond(client, input=WORDS, **options):
    return client.responses.create(model="fake", input=input, **options)


def test_a_string_input_gets_a_completed_response(client):
    response = respond(client, metadata={"team": "a"}, temperature=0.5, top_p=0.9)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.incomplete_details is None and response.error is None
    assert response.output_text == WORDS
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert [part.type for part in message.content] == ["output_text"]
    assert response.metadata == {"team": "a"} and response.temperature == 0.5 and response.top_p == 0.9
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (5, 6)  # five words; five and the end
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_instructions_and_message_items_reach_the_worker(client):
    response = respond(client, instructions="be very brief", input=[
        {"role": "developer", "content": "and kind"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "first answer", "annotations": []}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second "},
                                                        {"type": "input_text", "text": "question"}]},
    ])
    assert response.output_text == "second question" and response.instructions == "be very brief"
    assert response.usage.input_tokens == 3 + 2 + 2 + 2 + 2  # every word of every message


def test_max_output_tokens_cuts_the_response_as_incomplete(client):
    response = respond(client, max_output_tokens=2)
    assert response.output_text == "alpha beta "
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 2
    assert response.max_output_tokens == 2


def test_a_stream_sends_openais_events_in_order_and_the_same_text(client):
    events = list(respond(client, stream=True))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert deltas == 5 and [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = events[-1].response
    assert text == events[-4].text == events[-3].part.text == events[-2].item.content[0].text == WORDS
    assert done.output_text == respond(client).output_text == text and done.status == "completed"
    item_ids = {event.item_id for event in events if hasattr(event, "item_id")}
    assert item_ids == {done.output[0].id}
    assert done.usage.output_tokens == 6 and client.responses.retrieve(done.id).output_text == text


def test_a_cut_stream_ends_with_response_incomplete(client):
    events = list(respond(client, stream=True, max_output_tokens=1))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_continues_the_conversation(client):
    first = respond(client, "one two three", instructions="only for the first")
    second = respond(client, "four five", previous_response_id=first.id)
    assert second.output_text == "four five" and second.previous_response_id == first.id
    # The worker got the first input, its answer and the new input, but not the first's
    # instructions, which OpenAI applies to their own response only.
    assert second.usage.input_tokens == 3 + 3 + 2
    third = respond(client, "six", previous_response_id=second.id, instructions="now this")
    assert third.usage.input_tokens == 3 + 3 + 2 + 2 + 1 + 2
    streamed = list(respond(client, "seven", previous_response_id=third.id, stream=True))
    assert streamed[-1].response.usage.input_tokens == 3 + 3 + 2 + 2 + 1 + 1 + 1


def test_stored_responses_are_retrieved_and_deleted_and_unstored_ones_are_not(client):
    stored = respond(client)
    assert client.responses.retrieve(stored.id).model_dump() == stored.model_dump()
    client.responses.delete(stored.id)
    unstored = respond(client, store=False)
    for response_id in (stored.id, unstored.id, "resp_nothing"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response_id)


def test_an_unknown_previous_response_id_is_a_404_that_names_it(client):
    with pytest.raises(openai.NotFoundError) as info:
        respond(client, previous_response_id="resp_unknown")
    assert info.value.param == "previous_response_id" and "resp_unknown" in info.value.message


def test_the_store_forgets_the_least_recently_used_past_its_size(client):
    first = respond(client)
    for _ in range(8):  # the API keeps 8
        respond(client)
    with pytest.raises(openai.NotFoundError):
        respond(client, previous_response_id=first.id)


def test_unsupported_parameters_and_inputs_get_a_400_that_names_them(client):
    cases = {
        "tools": {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
        "reasoning": {"reasoning": {"effort": "low"}},
        "text.format.type": {"text": {"format": {"type": "xml"}}},
        "text.format.schema": {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
        "input.0.content.0.type": {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://example.com/cat.png"}]}]},
        "input.0": {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
        "input.0.role": {"input": [{"role": "tool", "content": "x"}]},
        "temperature": {"temperature": 3},
    }
    assert_each_refused_naming_its_param(lambda **options: respond(client, **options), cases)


def test_a_stream_that_fails_mid_way_ends_with_response_failed(tmp_path):
    slow = Cluster(tmp_path)
    try:
        slow.broker()
        slow.worker("--fake-delay", "0.3")
        slow.api("--timeout", "1")
        client = openai.OpenAI(base_url=f"{slow.url}/v1", api_key="unused", max_retries=0)
        events = list(respond(client, " ".join(["word"] * 20), stream=True))
    finally:
        slow.stop()
    assert "response.output_text.delta" in [event.type for event in events]  # it had begun
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "timeout" and "deadline" in failed.response.error.message
    assert [event.sequence_number for event in events] == list(range(len(events)))


def test_no_request_above_leaked_a_slot(cluster):
    wait_for(lambda: cluster.status()["models"]["fake"]["free"] == 16, 5.0, "every slot to be free")


# -- the store, pure ------------------------------------------------------------------------

def stored(text: str) -> StoredResponse:
    return StoredResponse({"text": text}, (ChatMessage(role="user", content=text),))


def test_the_store_keeps_the_most_recently_used():
    store = ResponseStore(2)
    store.put("a", stored("a"))
    store.put("b", stored("b"))
    assert store.get("a").body == {"text": "a"}  # used: now b is the least recent
    store.put("c", stored("c"))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.delete("a") and not store.delete("a") and store.get("a") is None


def test_a_store_of_size_zero_keeps_nothing():
    store = ResponseStore(0)
    store.put("a", stored("a"))
    assert store.get("a") is None


def test_a_text_format_reaches_the_worker_as_a_constraint(client):
    """The fake engine refuses any constraint: that refusal is the proof it got one."""
    for text_format in ({"type": "json_object"}, {"type": "json_schema", "name": "o", "schema": {"type": "object"}}):
        with pytest.raises(openai.BadRequestError, match="fake engine cannot constrain"):
            respond(client, text={"format": text_format})
