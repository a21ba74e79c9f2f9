"""The engine in-process: sequence bookkeeping on the fake model, generation on the real one."""

from __future__ import annotations

import pytest

from zmqchat.engine import FakeEngine, HFEngine, RequestError, SamplingParams


def job(job_id: str, content: str, **params) -> dict:
    return {"id": job_id, "messages": [{"role": "user", "content": content}], "params": params}


def collect(results: dict[str, dict], chunks: list, dones: list) -> None:
    """Add one step's output to `results`: per id, the text, finish reason and token counts,
    and the logprob entries of a sequence that asked for them."""
    for job_id, text, *logprobs in chunks:
        r = results.setdefault(job_id, {"text": ""})
        r["text"] += text
        if logprobs:
            r.setdefault("logprobs", []).extend(logprobs[0])
    for job_id, text, reason, prompt_tokens, completion_tokens, *logprobs in dones:
        r = results.setdefault(job_id, {"text": ""})
        r.update(text=r["text"] + text, reason=reason, usage=(prompt_tokens, completion_tokens))
        if logprobs:
            r.setdefault("logprobs", []).extend(logprobs[0])


def run_to_end(engine, max_steps: int = 500) -> dict[str, dict]:
    """Step until idle; what each sequence produced."""
    results: dict[str, dict] = {}
    for _ in range(max_steps):
        if not engine.sequences:
            return results
        collect(results, *engine.step())
    raise AssertionError("the engine never went idle")


# -- shared sequence logic, on the fake model ---------------------------------------------------

def test_sequences_join_and_leave_a_running_batch():
    engine = FakeEngine()
    engine.add(job("long", "a b c d e f"))
    engine.step()
    engine.step()
    engine.add(job("short", "x y"))  # joins while "long" is mid-way
    chunks, _ = engine.step()
    assert [c[0] for c in chunks] == ["long", "short"]
    _, dones = engine.step()
    assert [d[0] for d in dones] == []
    _, dones = engine.step()  # "short" has said both words: its end-of-sequence step
    assert [d[0] for d in dones] == ["short"] and list(engine.sequences) == ["long"]
    assert run_to_end(engine)["long"]["text"] == "f"  # five steps said a..e


def test_stop_string_split_across_tokens_is_never_sent():
    engine = FakeEngine()
    engine.add(job("s", "one two END three", stop=["two EN"]))
    result = run_to_end(engine)["s"]
    assert result == {"text": "one ", "reason": "stop", "usage": (4, 3)}


def test_text_that_only_looks_like_a_stop_string_is_released():
    engine = FakeEngine()
    engine.add(job("s", "tw two- tw", stop=["two-x"]))
    assert run_to_end(engine)["s"]["text"] == "tw two- tw"


def test_max_tokens_gives_length():
    engine = FakeEngine()
    engine.add(job("m", "a b c d", max_tokens=2))
    assert run_to_end(engine)["m"] == {"text": "a b ", "reason": "length", "usage": (4, 2)}


def test_cancel_removes_the_sequence_and_confirms():
    engine = FakeEngine()
    engine.add(job("c", "a b c"))
    engine.step()
    assert engine.cancel("c") == ["c", "", "cancelled", 3, 1]
    assert not engine.sequences and engine.cancel("c") is None


def test_prompt_beyond_the_context_window_is_refused():
    engine = FakeEngine(context_window=4)
    with pytest.raises(RequestError, match="maximum context length is 4 tokens"):
        engine.add(job("big", "one two three four five"))


def test_prompt_plus_max_tokens_beyond_the_window_is_refused_with_the_numbers():
    engine = FakeEngine(context_window=10)
    with pytest.raises(RequestError, match=r"context length is 10 tokens.*requested 13 tokens \(3 in the prompt, "
                                           r"10 for the completion\)"):
        engine.add(job("big", "one two three", max_tokens=10))
    engine.add(job("fits", "one two three", max_tokens=7))


def test_logprobs_leave_with_their_text_and_never_for_a_stop_string():
    engine = FakeEngine()
    engine.add(job("s", "one two END three", stop=["two EN"], logprobs=2))
    result = run_to_end(engine)["s"]
    assert result["text"] == "one "
    assert result["logprobs"] == [["one ", b"one ", 0.0, [["one ", b"one ", 0.0], ["</s>", b"</s>", -9999.0]], 0]]


def test_logprobs_cover_every_token_of_a_reply_in_order():
    engine = FakeEngine()
    engine.add(job("l", "a bb ccc", logprobs=0))
    result = run_to_end(engine)["l"]
    assert [e[0] for e in result["logprobs"]] == ["a ", "bb ", "ccc"]  # no entry for end-of-sequence
    assert [e[4] for e in result["logprobs"]] == [0, 2, 5] and all(e[3] == [] for e in result["logprobs"])


def test_a_completion_echoes_its_prompt_before_the_output():
    engine = FakeEngine()
    engine.add({"id": "e", "prompt": "say this", "params": {"echo": True, "logprobs": 0}})
    result = run_to_end(engine)["e"]
    assert result["text"] == "say thissay this"
    assert [e[4] for e in result["logprobs"]] == [8, 12]  # offsets in the echoed text


def test_a_prompt_of_token_ids_is_checked_against_the_vocabulary():
    engine = FakeEngine()
    ids = engine.encode_text("red green blue")
    engine.add({"id": "ids", "prompt": ids, "params": {"echo": True}})
    assert run_to_end(engine)["ids"]["text"] == "red green bluered green blue"
    for bad in ([], [engine.vocab_size], [-1], ["red"]):
        with pytest.raises(RequestError, match="token ids"):
            engine.add({"id": "bad", "prompt": bad, "params": {}})


def test_a_full_engine_refuses_more_work():
    engine = FakeEngine(slots=1)
    engine.add(job("a", "x"))
    with pytest.raises(RequestError) as info:
        engine.add(job("b", "y"))
    assert info.value.status == 503


@pytest.mark.parametrize("params", [{"temperature": "hot"}, {"temperature": 9}, {"top_p": 0},
                                    {"max_tokens": 0}, {"temperature": float("nan")}, {"logprobs": 21},
                                    {"stop": [f"s{i}" for i in range(17)]}])
def test_bad_sampling_parameters_are_refused(params):
    with pytest.raises(RequestError):
        SamplingParams.from_wire(params)


# -- the real default model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    from zmqchat import models

    return HFEngine(models.load(device="cpu"), slots=4)


def test_default_model_knows_the_capital_of_france(smol):
    smol.add(job("q", "What is the capital of France?", temperature=0, max_tokens=20))
    result = run_to_end(smol)["q"]
    assert "Paris" in result["text"] and result["reason"] == "stop"
    assert result["usage"][1] == len(smol.tokenizer(result["text"]).input_ids) + 1  # + end of turn


def test_interleaved_greedy_generation_matches_one_at_a_time(smol):
    prompts = {"a": "Name three colours.", "b": "What is 2+2?", "c": "Say hello in French."}
    alone = {}
    for job_id, prompt in prompts.items():
        smol.add(job(job_id, prompt, temperature=0, max_tokens=12))
        alone.update(run_to_end(smol))
    for job_id, prompt in prompts.items():
        smol.add(job(job_id, prompt, temperature=0, max_tokens=12))
    assert run_to_end(smol) == alone


def test_seed_makes_sampling_repeatable(smol):
    texts = []
    for seed in (7, 7, 8):
        smol.add(job("s", "Write a word.", temperature=1.0, top_p=0.9, seed=seed, max_tokens=8))
        texts.append(run_to_end(smol)["s"]["text"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("text", ["巴黎是法国的首都。", "Paris 🇫🇷 is lovely 😀👍", "naïve café — déjà vu"])
def test_streamed_text_is_exact_across_multibyte_characters(smol, text):
    from zmqchat.engine import Sequence

    ids = smol.tokenizer(text, add_special_tokens=False).input_ids
    seq = Sequence("x", [1], SamplingParams(), max_tokens=len(ids) + 1)
    pieces = [smol._append(seq, token, None) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + smol._flush(seq) == text


def test_sequences_joining_a_running_batch_generate_what_they_would_alone(smol):
    prompts = ["Name three colours.", "What is 2+2?", "Say hello in French.", "Count to five."]
    alone = {}
    for i, prompt in enumerate(prompts):
        smol.add(job(f"q{i}", prompt, temperature=0, max_tokens=10))
        alone.update(run_to_end(smol))
    # q0 starts alone; q1 and q2 join after two and four steps; q3 joins as the batch shrinks.
    results: dict[str, dict] = {}
    schedule = {0: ["q0"], 2: ["q1"], 4: ["q2"], 9: ["q3"]}
    batch_sizes = []
    for step in range(60):
        for job_id in schedule.get(step, []):
            smol.add(job(job_id, prompts[int(job_id[1])], temperature=0, max_tokens=10))
        if not smol.sequences and step > 9:
            break
        batch_sizes.append(len(smol.scheduler))
        collect(results, *smol.step())
    assert max(batch_sizes) >= 3  # they really shared forward passes
    assert results == alone
    assert smol.rows == [] and smol.cache is None  # everything left the batch


def test_cancelled_sequence_leaves_the_batch_at_the_next_step(smol):
    smol.add(job("stay", "Tell me a long story.", temperature=0, max_tokens=30))
    smol.add(job("go", "Tell me another long story.", temperature=0, max_tokens=30))
    smol.step()
    assert len(smol.rows) == 2
    smol.cancel("go")
    smol.step()
    assert [s.id for s in smol.rows] == ["stay"] and smol.cache.layers[0].keys.shape[0] == 1
    smol.cancel("stay")
    smol.step()
    assert smol.rows == [] and smol.cache is None


def test_batched_greedy_output_matches_transformers_generate(smol):
    import torch

    prompts = ["What is the capital of France?", "Name a fruit.", "Write one word about the sea.",
               "用中文说你好"]
    assert smol.preamble  # the shared preamble's KV is reused: this test covers that path too
    for i, prompt in enumerate(prompts):
        smol.add(job(f"p{i}", prompt, temperature=0, max_tokens=16))
    batched = run_to_end(smol)
    for i, prompt in enumerate(prompts):
        ids = smol.encode_chat([{"role": "user", "content": prompt}])
        with torch.inference_mode():
            out = smol.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        reference = smol.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        # A reply cut by max_tokens mid-character ends without the broken half (U+FFFD).
        assert batched[f"p{i}"]["text"] == reference.rstrip("\ufffd")


def test_unset_parameters_take_the_models_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9}
    assert SamplingParams.from_wire({"temperature": None, "top_p": None}, defaults) == SamplingParams(
        temperature=0.2, top_p=0.9)
    assert SamplingParams.from_wire({"temperature": 0.0}, defaults).temperature == 0.0  # the request wins


def test_a_request_without_max_tokens_is_bounded():
    from zmqchat.engine import DEFAULT_MAX_TOKENS

    engine = FakeEngine(context_window=100_000)
    engine.add(job("unbounded", "hi"))
    assert engine.sequences["unbounded"].max_tokens == DEFAULT_MAX_TOKENS


def test_default_model_samples_as_its_card_says(smol):
    assert smol.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    import torch

    from zmqchat.engine import nucleus

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    weights, tokens = nucleus(probs, torch.tensor([0.7, 0.6]))
    kept = [sorted(int(t) for t, w in zip(ts, ws) if w > 0) for ts, ws in zip(tokens, weights)]
    assert kept[0] == [0, 1] and len(kept[1]) == 3  # 0.6 of a uniform four takes any three
    wide = torch.softmax(torch.randn(2, 5000), -1)  # top_p 0.9999 needs more than the candidates
    weights, tokens = nucleus(wide, torch.tensor([0.9999, 0.9999]))
    assert weights.shape[-1] == 5000 and (weights > 0).sum(-1).min() > 1024
    assert torch.allclose(weights.sum(-1), torch.ones(2), atol=1e-3)
    assert nucleus(probs, torch.tensor([1.0, 1.0]))[1] is None  # no filtering: the whole distribution


def test_ignore_eos_runs_to_max_tokens():
    engine = FakeEngine()
    engine.add(job("e", "two words", max_tokens=5, ignore_eos=True))
    result = run_to_end(engine)["e"]
    assert result["reason"] == "length" and result["usage"] == (2, 5)


def test_top_k_keeps_only_each_rows_likeliest():
    import torch

    from zmqchat.engine import top_k_only

    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    kept = top_k_only(logits, [2, 0])
    assert torch.isinf(kept[0]).tolist() == [True, False, False, True]
    assert torch.equal(kept[1], logits[1])  # 0: no limit


def test_penalties_push_down_what_was_already_said():
    import torch

    from zmqchat.engine import Sequence, apply_penalties

    def seq(**params):
        return Sequence("s", [1], SamplingParams(**params), 10, output_ids=[2, 2, 3])

    logits = torch.zeros(2, 5)
    out = apply_penalties(logits, [seq(frequency_penalty=0.5), seq(presence_penalty=1.0)])
    assert out[0].tolist() == [0.0, 0.0, -1.0, -0.5, 0.0]
    assert out[1].tolist() == [0.0, 0.0, -1.0, -1.0, 0.0]
    assert apply_penalties(logits, [seq(), seq()]) is logits  # nothing to do, nothing copied


def test_frequency_penalty_changes_a_repetitive_greedy_reply(smol):
    prompt = "Repeat the word hello twenty times."
    replies = []
    for penalty in (0.0, 2.0):
        smol.add(job("r", prompt, temperature=0, max_tokens=24, frequency_penalty=penalty))
        replies.append(run_to_end(smol)["r"]["text"])
    assert replies[0].lower().count("hello") > replies[1].lower().count("hello")


def test_default_model_logprobs_describe_its_own_greedy_choices(smol):
    import math

    smol.add(job("lp", "What is the capital of France?", temperature=0, max_tokens=12, logprobs=3))
    result = run_to_end(smol)["lp"]
    entries = result["logprobs"]
    assert "".join(e[0] for e in entries) == result["text"]
    for token, raw, logprob, top, _ in entries:
        assert raw.decode() == token
        assert len(top) == 3 and top[0][0] == token and top[0][2] == logprob  # greedy: the likeliest
        assert [lp for *_, lp in top] == sorted((lp for *_, lp in top), reverse=True)
        assert logprob <= 0 and sum(math.exp(lp) for *_, lp in top) <= 1.0001


def test_default_model_completes_raw_text(smol):
    prompt = "The capital of France is"
    smol.add({"id": "c", "prompt": prompt, "params": {"temperature": 0, "max_tokens": 8, "echo": True}})
    result = run_to_end(smol)["c"]
    assert result["text"].startswith(prompt) and len(result["text"]) > len(prompt)
    assert result["usage"] == (len(smol.tokenizer(prompt).input_ids), 8)


def test_default_model_names_a_token_that_is_part_of_a_character_by_its_bytes(smol):
    from zmqchat.engine import Sequence

    ids = smol.tokenizer("Tea 🍵", add_special_tokens=False).input_ids
    seq = Sequence("t", [1], SamplingParams(logprobs=0), max_tokens=len(ids) + 1)
    for token in ids:
        smol._append(seq, token, (0.0, []))
    smol._flush(seq)
    names, raws = zip(*[(entry[0], entry[1]) for *_, entry in seq.logprobs])
    assert b"".join(raws).decode() == "Tea 🍵"  # the bytes rebuild the text, emoji and all
    assert any(name.startswith("bytes:\\x") for name in names)  # the emoji's pieces, named as OpenAI does
