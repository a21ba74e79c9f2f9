"""The engine in-process: sequence bookkeeping on the fake runner, generation on the real model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DEVICE

from zmqchat.config import BLOCK_SIZE, DEFAULT_MAX_TOKENS
from zmqchat.engine import Engine, FakeRunner
from zmqchat.protocol import (
    Alternative,
    ChatMessage,
    Constraint,
    Embed,
    ErrorCode,
    JobError,
    Output,
    SamplingParams,
    Submit,
    Usage,
)


def job(job_id: str, content: str, **params) -> Submit:
    return Submit(job_id, "m", 30.0, SamplingParams(**params), messages=[ChatMessage("user", content)])


def completion(job_id: str, prompt: str | list[int], **params) -> Submit:
    return Submit(job_id, "m", 30.0, SamplingParams(**params), prompt=prompt)


def submit(engine: Engine, job: Submit) -> None:
    """What the worker does with a job: prepare it (on its own thread there), then add it."""
    engine.add(engine.prepare(job))


def collect(results: dict[str, dict], outputs: list[Output]) -> None:
    """Add one step's outputs to `results`: per id, the text, finish reason and usage, and the
    logprob entries of a sequence that asked for them."""
    for out in outputs:
        r = results.setdefault(out.id, {"text": ""})
        r["text"] += out.text
        if out.logprobs is not None:
            r.setdefault("logprobs", []).extend(out.logprobs)
        if out.finish:
            r.update(reason=out.finish, usage=(out.usage.prompt_tokens, out.usage.completion_tokens))


def run_to_end(engine: Engine, max_steps: int = 500, results: dict[str, dict] | None = None) -> dict[str, dict]:
    """Step until idle; what each sequence produced (added to `results`)."""
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_work:
            return results
        collect(results, engine.step())
    raise AssertionError("the engine never went idle")


def refused(engine: Engine, job: Submit) -> JobError:
    with pytest.raises(JobError) as info:
        submit(engine, job)
    return info.value


@pytest.fixture
def fake() -> Engine:
    return Engine(FakeRunner())


# -- shared sequence logic, on the fake runner ---------------------------------------------------

def test_importing_the_engine_does_not_load_torch():
    code = "import sys, zmqchat.engine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sequences_join_and_leave_a_running_batch(fake):
    submit(fake, job("long", "a b c d e f"))
    fake.step()
    fake.step()
    submit(fake, job("short", "x y"))  # joins while "long" is mid-way
    assert [o.id for o in fake.step()] == ["long", "short"]
    assert [o.id for o in fake.step() if o.finish] == []
    done = [o for o in fake.step() if o.finish]  # "short" has said both words: its end-of-sequence step
    assert [o.id for o in done] == ["short"] and fake.job_ids() == ["long"]
    assert run_to_end(fake)["long"]["text"] == "f"  # five steps said a..e


def test_idle_engine_steps_to_nothing(fake):
    assert fake.step() == [] and not fake.has_work and fake.job_ids() == []


def test_a_chat_counts_every_word_of_every_message(fake):
    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "say a b c"), ChatMessage("assistant", "ok")]
    submit(fake, Submit("m", "m", 30.0, messages=messages))
    result = run_to_end(fake)["m"]
    assert result == {"text": "say a b c", "reason": "stop", "usage": (7, 5)}  # 4 words + end-of-sequence


def test_stop_string_split_across_tokens_is_never_sent(fake):
    submit(fake, job("s", "one two END three", stop=("two EN",)))
    assert run_to_end(fake)["s"] == {"text": "one ", "reason": "stop", "usage": (4, 3)}


def test_outputs_count_their_tokens_and_the_first_tells_the_prompts_size(fake):
    """What a stream's running usage is made of: held-back text's tokens are counted by the output
    that sends it, so the counts add up to the usage at the end."""
    submit(fake, job("s", "one two END three", stop=("two EN",)))
    outputs = [o for _ in range(10) for o in fake.step()]
    assert [(o.text, o.tokens) for o in outputs] == [("one ", 1), ("", 2)]  # "two " held back, then dropped
    assert outputs[0].usage == Usage(4, 1) and outputs[-1].usage == Usage(4, 3)
    assert sum(o.tokens for o in outputs) == outputs[-1].usage.completion_tokens


def test_text_that_only_looks_like_a_stop_string_is_released(fake):
    submit(fake, job("s", "tw two- tw", stop=("two-x",)))
    assert run_to_end(fake)["s"]["text"] == "tw two- tw"


def test_max_tokens_gives_length(fake):
    submit(fake, job("m", "a b c d", max_tokens=2))
    assert run_to_end(fake)["m"] == {"text": "a b ", "reason": "length", "usage": (4, 2)}


def test_ignore_eos_runs_to_max_tokens(fake):
    submit(fake, job("e", "two words", max_tokens=5, ignore_eos=True))
    result = run_to_end(fake)["e"]
    assert result["reason"] == "length" and result["usage"] == (2, 5)


def test_a_request_without_max_tokens_is_bounded():
    engine = Engine(FakeRunner(context_window=100_000))
    submit(engine, job("unbounded", "hi"))
    assert engine.scheduler.get("unbounded").max_tokens == DEFAULT_MAX_TOKENS


def test_cancel_removes_the_sequence_and_confirms(fake):
    submit(fake, job("c", "a b c"))
    fake.step()
    assert fake.cancel("c") == Output("c", "", 0, None, "cancelled", Usage(3, 1))  # its one token went out
    assert not fake.has_work and fake.cancel("c") is None


def test_a_waiting_sequence_can_be_cancelled():
    runner = FakeRunner()
    runner.token_budget = BLOCK_SIZE  # one block: a job of 2 + 4 tokens fits; two do not
    engine = Engine(runner)
    submit(engine, job("run", "a b", max_tokens=4))
    submit(engine, job("wait", "c d", max_tokens=4))
    engine.step()
    assert [s.id for s in engine.scheduler.waiting] == ["wait"]
    assert engine.cancel("wait").usage.completion_tokens == 0
    assert run_to_end(engine)["run"]["text"] == "b"


def test_prompt_beyond_the_context_window_is_refused():
    error = refused(Engine(FakeRunner(context_window=4)), job("big", "one two three four five"))
    assert error.code == ErrorCode.CONTEXT_LENGTH
    assert error.message == ("This model's maximum context length is 4 tokens. However, the prompt has 5 tokens. "
                             "Please shorten the prompt.")


def test_prompt_plus_max_tokens_beyond_the_window_is_refused_with_the_numbers():
    engine = Engine(FakeRunner(context_window=10))
    error = refused(engine, job("big", "one two three", max_tokens=10))
    assert error.code == ErrorCode.CONTEXT_LENGTH
    assert error.message == ("This model's maximum context length is 10 tokens. However, you requested 13 tokens "
                             "(3 in the prompt, 10 for the completion). Please reduce the prompt or max_tokens.")
    submit(engine, job("fits", "one two three", max_tokens=7))


def test_a_job_over_the_token_budget_is_refused():
    runner = FakeRunner()
    runner.token_budget = BLOCK_SIZE
    error = refused(Engine(runner), job("big", "one two three", max_tokens=BLOCK_SIZE - 2))
    assert error.code == ErrorCode.INVALID_REQUEST and f"KV cache holds ({BLOCK_SIZE} tokens)" in error.message


def test_logprobs_leave_with_their_text_and_never_for_a_stop_string(fake):
    submit(fake, job("s", "one two END three", stop=("two EN",), logprobs=2))
    result = run_to_end(fake)["s"]
    assert result["text"] == "one "
    [entry] = result["logprobs"]
    assert (entry.token, entry.raw, entry.logprob, entry.offset) == ("one ", b"one ", 0.0, 0)
    assert entry.top == [Alternative("one ", b"one ", 0.0), Alternative("</s>", b"</s>", -9999.0)]


def test_logprobs_cover_every_token_of_a_reply_in_order(fake):
    submit(fake, job("l", "a bb ccc", logprobs=0))
    entries = run_to_end(fake)["l"]["logprobs"]
    assert [e.token for e in entries] == ["a ", "bb ", "ccc"]  # no entry for end-of-sequence
    assert [e.offset for e in entries] == [0, 2, 5] and all(e.top == [] for e in entries)


def test_no_logprobs_unless_asked(fake):
    submit(fake, job("n", "a b"))
    submit(fake, job("y", "a b", logprobs=0))
    outputs = fake.step()
    assert [o.logprobs is None for o in outputs] == [True, False]


def test_a_completion_echoes_its_prompt_before_the_output(fake):
    submit(fake, completion("e", "say this", echo=True, logprobs=0))
    result = run_to_end(fake)["e"]
    assert result["text"] == "say thissay this"
    assert [e.offset for e in result["logprobs"]] == [8, 12]  # offsets in the echoed text


def test_max_tokens_0_scores_the_prompt_in_one_step_beside_a_running_sequence(fake):
    submit(fake, job("running", "a b c"))
    fake.step()
    submit(fake, completion("score", "to be or", echo=True, max_tokens=0, logprobs=1, prompt_logprobs=1))
    outputs = {o.id: o for o in fake.step()}
    scored = outputs["score"]
    assert (scored.text, scored.finish, scored.usage.completion_tokens, scored.logprobs) == ("to be or", "length", 0, [])
    assert [(t.token, t.offset, t.logprob, t.rank) for t in scored.prompt_logprobs] == [
        ("to ", 0, None, 0), ("be ", 3, 0.0, 1), ("or", 6, 0.0, 1)]
    assert outputs["running"].text == "b " and fake.scheduler.get("score") is None
    assert run_to_end(fake)["running"]["text"] == "c"


def test_prompt_logprobs_leave_with_the_first_output_only(fake):
    submit(fake, job("p", "x y", prompt_logprobs=0))
    first, *rest = [o for _ in range(4) for o in fake.step()]
    assert [t.token for t in first.prompt_logprobs] == ["x ", "y"] and first.prompt_logprobs[1].top == []
    assert first.text == "x " and all(o.prompt_logprobs is None for o in rest)


def vectors(outputs: list[Output], job_id: str) -> list[tuple[float, ...]]:
    import struct

    raw = [v for o in outputs if o.id == job_id for v in o.embeddings or []]
    return [struct.unpack(f"<{len(v) // 4}f", v) for v in raw]


def test_an_embedding_job_runs_beside_a_running_sequence_and_leaves_when_done(fake):
    submit(fake, job("chat", "a b c"))
    fake.step()
    submit(fake, Submit("emb", "m", 30.0, embed=Embed(["a b ", [1, 2], "c"], dimensions=4)))
    outputs = fake.step()
    assert [o.id for o in outputs] == ["chat", "emb"] and outputs[1].finish == "stop"
    assert outputs[1].usage == Usage(5, 0) and len(vectors(outputs, "emb")) == 3
    assert all(len(v) == 4 for v in vectors(outputs, "emb"))
    assert vectors(outputs, "emb")[0] == vectors(outputs, "emb")[1]  # "a b " is ids 1, 2
    assert fake.job_ids() == ["chat"]


def test_a_large_embedding_job_is_spread_over_steps_in_order():
    engine = Engine(FakeRunner())
    engine.embed_inputs_per_step = 2  # as a model of 1 MiB vectors would have it
    inputs = ["one two", "three", "four five six", "seven", "one two"]
    engine.add(engine.prepare(Submit("emb", "m", 30.0, embed=Embed(inputs))))
    steps = []
    while engine.has_work:
        steps.append(engine.step())
    assert len(steps) > 1 and all(o.finish is None for step in steps[:-1] for o in step)
    together = vectors([o for step in steps for o in step], "emb")
    alone = []
    for i, text in enumerate(inputs):
        engine.add(engine.prepare(Submit(f"alone{i}", "m", 30.0, embed=Embed([text]))))
        alone += vectors(engine.step(), f"alone{i}")
    assert together == alone and together[0] == together[4]


def test_embedding_jobs_take_slots_are_cancelled_and_refused_where_not_served():
    engine = Engine(FakeRunner(), slots=2, tasks=("embed",))
    engine.add(engine.prepare(Submit("e1", "m", 30.0, embed=Embed(["x"]))))
    assert refused(engine, job("chat", "x")).message == "this worker does not generate with its model"
    engine.add(engine.prepare(Submit("e2", "m", 30.0, embed=Embed(["y z"]))))
    assert refused(engine, Submit("e3", "m", 30.0, embed=Embed(["w"]))).code == ErrorCode.OVERLOADED
    assert engine.cancel("e2") == Output("e2", finish="cancelled", usage=Usage(2, 0))
    assert engine.job_ids() == ["e1"]


def test_embedding_inputs_are_checked_and_the_error_names_the_parameter(fake):
    checks = [(Embed(["x"], dimensions=9), "dimensions", "more than this model"),
              (Embed(["ok", [10**6]]), "input", "input[1] holds token ids outside"),
              (Embed(["w " * 4097]), "input", "input[0] has 4097 tokens")]
    for embed, param, message in checks:
        error = refused(fake, Submit("bad", "m", 30.0, embed=embed))
        assert error.param == param and message in error.message


def test_take_inputs_fills_a_step_first_come_first_served():
    from zmqchat.engine.embedding import EmbedJob, take_inputs

    a, b = EmbedJob("a", [[1] * 3, [1] * 2], None), EmbedJob("b", [[1] * 6, [1]], None)
    assert [(job.id, n) for job, n in take_inputs([a, b], max_inputs=8, budget=8).taken] == [("a", 2)]
    assert [(job.id, n) for job, n in take_inputs([a, b], max_inputs=8, budget=24).taken] == [("a", 2), ("b", 2)]
    assert [(job.id, n) for job, n in take_inputs([a, b], max_inputs=3, budget=20).taken] == [("a", 2), ("b", 1)]
    long = EmbedJob("long", [[1] * 50], None)
    assert take_inputs([long, a], max_inputs=8, budget=8).inputs == [[1] * 50]  # alone, however long


def test_a_vector_cut_to_fewer_dimensions_is_scaled_back_to_unit_length():
    import struct

    from zmqchat.engine.embedding import packed

    assert struct.unpack("<2f", packed([0.6, 0.0, 0.8], 2)) == (1.0, 0.0)
    assert struct.unpack("<3f", packed([0.6, 0.0, 0.8], None)) == pytest.approx((0.6, 0.0, 0.8))


def test_a_prompt_of_token_ids_is_checked_against_the_vocabulary(fake):
    ids = fake.runner.encode_text("red green blue")
    submit(fake, completion("ids", ids, echo=True))
    assert run_to_end(fake)["ids"]["text"] == "red green bluered green blue"
    for bad in ([], [fake.runner.vocab_size]):
        error = refused(fake, completion("bad", bad))
        assert error.code == ErrorCode.INVALID_REQUEST and "token ids" in error.message


def test_a_prompt_without_text_is_refused(fake):
    assert refused(fake, job("empty", "  ")).code == ErrorCode.INVALID_REQUEST


def test_a_full_engine_refuses_more_work():
    engine = Engine(FakeRunner(), slots=1)
    submit(engine, job("a", "x"))
    assert refused(engine, job("b", "y")).code == ErrorCode.OVERLOADED


def test_the_fake_refuses_a_constraint_it_cannot_follow(fake):
    error = refused(fake, job("c", "hi", constraint=Constraint("regex", "[ab]+")))
    assert error.code == ErrorCode.INVALID_REQUEST and "fake engine cannot constrain" in error.message


def test_a_running_id_is_refused(fake):
    submit(fake, job("a", "x"))
    error = refused(fake, job("a", "y"))
    assert error.code == ErrorCode.INVALID_REQUEST and "already running" in error.message


def test_the_fake_takes_its_delay_once_per_step_whatever_the_batch():
    import time

    engine = Engine(FakeRunner(delay=0.05))
    for i in range(8):
        submit(engine, job(f"j{i}", "a"))
    start = time.monotonic()
    engine.step()
    assert 0.05 <= time.monotonic() - start < 0.05 * 3


# -- the real default model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> Engine:
    from zmqchat import models
    from zmqchat.engine import HFRunner

    return Engine(HFRunner(models.load(device=DEVICE)), slots=4)


def greedy_alone(engine: Engine, prompts: dict[str, str], max_tokens: int) -> dict[str, dict]:
    results = {}
    for job_id, prompt in prompts.items():
        submit(engine, job(job_id, prompt, temperature=0, max_tokens=max_tokens))
        results.update(run_to_end(engine))
    return results


def record_tokens(engine: Engine, monkeypatch) -> dict[str, list[int]]:
    """Every token the runner gives each sequence, from now on."""
    tokens: dict[str, list[int]] = {}
    run = engine.runner.run

    def recording(batch):
        out = run(batch)
        for seq, token in zip(batch.sequences, out[0]):
            tokens.setdefault(seq.id, []).append(token)
        return out

    monkeypatch.setattr(engine.runner, "run", recording)
    return tokens


@pytest.mark.model
def test_a_constrained_sequence_ends_with_its_grammar_whatever_min_tokens_and_ignore_eos_say(smol):
    choice = Constraint("lark", 'start: "yes" | "no"')
    submit(smol, job("c", "Is the sky blue?", temperature=1.0, max_tokens=30, min_tokens=10, ignore_eos=True,
                     constraint=choice))
    submit(smol, job("free", "Is the sky blue?", temperature=0, max_tokens=5, ignore_eos=True))
    results = run_to_end(smol)
    assert results["c"]["text"] in ("yes", "no") and results["c"]["reason"] == "stop"
    assert results["free"]["reason"] == "length"  # alongside, unconstrained, as before


@pytest.mark.model
def test_default_model_knows_the_capital_of_france(smol):
    submit(smol, job("q", "What is the capital of France?", temperature=0, max_tokens=20))
    result = run_to_end(smol)["q"]
    assert "Paris" in result["text"] and result["reason"] == "stop"
    assert result["usage"][1] == len(smol.runner.tokenizer(result["text"]).input_ids) + 1  # + end of turn


@pytest.mark.model
def test_interleaved_greedy_generation_matches_one_at_a_time(smol):
    prompts = {"a": "Name three colours.", "b": "What is 2+2?", "c": "Say hello in French."}
    alone = greedy_alone(smol, prompts, 12)
    for job_id, prompt in prompts.items():
        submit(smol, job(job_id, prompt, temperature=0, max_tokens=12))
    assert run_to_end(smol) == alone


@pytest.mark.model
def test_sequences_joining_and_leaving_a_running_batch_get_the_tokens_they_get_alone(smol, monkeypatch):
    prompts = {"q0": "Name three colours.", "q1": "What is 2+2?", "q2": "Say hello in French.",
               "q3": "Count to five."}
    max_tokens = {"q0": 10, "q1": 4, "q2": 10, "q3": 10}  # q1, a middle row, leaves early
    tokens = record_tokens(smol, monkeypatch)
    alone = {}
    for job_id, prompt in prompts.items():
        submit(smol, job(job_id, prompt, temperature=0, max_tokens=max_tokens[job_id]))
        alone.update(run_to_end(smol))
    tokens_alone = dict(tokens)
    tokens.clear()
    # q0 starts alone; q1 and q2 join after two and four steps; q3 joins as the batch shrinks.
    results: dict[str, dict] = {}
    schedule = {0: ["q0"], 2: ["q1"], 4: ["q2"], 9: ["q3"]}
    batch_sizes = []
    for step in range(60):
        for job_id in schedule.get(step, []):
            submit(smol, job(job_id, prompts[job_id], temperature=0, max_tokens=max_tokens[job_id]))
        if not smol.has_work and step > 9:
            break
        batch_sizes.append(len(smol.scheduler.running) + len(smol.scheduler.waiting))
        collect(results, smol.step())
    assert max(batch_sizes) >= 3  # they really shared forward passes
    assert tokens == tokens_alone and results == alone
    assert smol.scheduler.blocks.in_use == 0  # everything left the cache


@pytest.mark.model
def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_decodes_and_both_get_their_tokens_alone(smol, monkeypatch):
    # Prompts no other test sends, so nothing of them is cached yet, and run batched first.
    prompts = {"stream": "Count to twenty.", "long": "Summarise this: " + "the quick brown fox jumps over a dog. " * 10}
    sampled: list[list[str]] = []  # who got a token, step by step
    run = smol.runner.run

    def recording(batch):
        sampled.append([seq.id for seq in batch.sequences])
        return run(batch)

    monkeypatch.setattr(smol.runner, "run", recording)
    results: dict[str, dict] = {}
    submit(smol, job("stream", prompts["stream"], temperature=0, max_tokens=12))
    collect(results, smol.step())
    monkeypatch.setattr(smol.scheduler, "step_tokens", 1)  # from now on a prompt gets the least a step gives: a block
    joined = len(sampled)
    submit(smol, job("long", prompts["long"], temperature=0, max_tokens=12))
    run_to_end(smol, results=results)
    prefill_steps = next(i for i, ids in enumerate(sampled[joined:]) if "long" in ids)
    assert prefill_steps >= 4 and all(ids == ["stream"] for ids in sampled[joined:joined + prefill_steps])
    monkeypatch.undo()
    assert results == greedy_alone(smol, prompts, 12)


@pytest.mark.model
def test_cancelled_sequence_leaves_the_batch_at_the_next_step(smol):
    submit(smol, job("stay", "Tell me a long story.", temperature=0, max_tokens=30))
    submit(smol, job("go", "Tell me another long story.", temperature=0, max_tokens=30))
    smol.step()
    stay = smol.scheduler.get("stay")
    assert len(smol.scheduler.running) == 2
    smol.cancel("go")  # its blocks are free at once
    assert smol.scheduler.blocks.in_use == len(stay.blocks)
    smol.step()
    assert smol.job_ids() == ["stay"] and len(stay.output_ids) == 2
    smol.cancel("stay")
    assert smol.scheduler.blocks.in_use == 0


@pytest.mark.model
def test_batched_greedy_output_matches_transformers_generate(smol):
    import torch

    runner = smol.runner
    prompts = ["What is the capital of France?", "Name a fruit.", "Write one word about the sea.", "用中文说你好"]
    submit(smol, job("first", "Hello", max_tokens=1))
    run_to_end(smol)  # the chat template's preamble is cached now: this test covers reusing it too
    for i, prompt in enumerate(prompts):
        submit(smol, job(f"p{i}", prompt, temperature=0, max_tokens=16))
    batched: dict[str, dict] = {}
    collect(batched, smol.step())
    assert all(smol.scheduler.get(f"p{i}").cached_tokens > 0 for i in range(len(prompts)))
    run_to_end(smol, results=batched)
    for i, prompt in enumerate(prompts):
        ids = runner.encode_chat([ChatMessage("user", prompt)])
        with torch.inference_mode():
            out = runner.model.generate(torch.tensor([ids], device=runner.model.device), max_new_tokens=16,
                                         do_sample=False)
        reference = runner.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        # A reply cut by max_tokens mid-character ends without the broken half (U+FFFD).
        assert batched[f"p{i}"]["text"] == reference.rstrip("\ufffd")


@pytest.mark.model
def test_seed_makes_sampling_repeatable(smol):
    def sample(seed: int) -> str:
        submit(smol, job("s", "Write a word.", temperature=1.0, top_p=0.9, seed=seed, max_tokens=8))
        return run_to_end(smol)["s"]["text"]

    first = sample(7)
    assert sample(7) == first
    assert len({sample(seed) for seed in range(8, 12)} | {first}) > 1  # and the seed matters


@pytest.mark.model
def test_temperature_top_k_and_top_p_shape_the_sampling(smol):
    def texts(**params) -> set[str]:
        found = set()
        for seed in range(6):
            submit(smol, job("t", "Write a word.", max_tokens=6, seed=seed, **params))
            found.add(run_to_end(smol)["t"]["text"])
        return found

    greedy = texts(temperature=0)
    assert len(greedy) == 1  # temperature 0 is greedy, seed or not
    assert texts(temperature=1.5, top_k=1) == greedy  # top_k 1 leaves only the likeliest
    assert texts(temperature=1.5, top_p=1e-6) == greedy  # so does a tiny top_p
    assert len(texts(temperature=1.5)) > 1


@pytest.mark.model
def test_the_models_own_sampling_defaults_apply_when_a_job_sets_none(smol):
    assert smol.runner.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}
    submit(smol, job("d", "hi", max_tokens=1))
    assert (smol.scheduler.get("d").params.temperature, smol.scheduler.get("d").params.top_p) == (0.2, 0.9)
    smol.cancel("d")


@pytest.mark.model
def test_frequency_penalty_changes_a_repetitive_greedy_reply(smol):
    prompt = "Repeat the word hello twenty times."
    replies = []
    for penalty in (0.0, 2.0):
        submit(smol, job("r", prompt, temperature=0, max_tokens=24, frequency_penalty=penalty))
        replies.append(run_to_end(smol)["r"]["text"])
    assert replies[0].lower().count("hello") > replies[1].lower().count("hello")


@pytest.mark.model
def test_default_model_logprobs_describe_its_own_greedy_choices(smol):
    import math

    submit(smol, job("lp", "What is the capital of France?", temperature=0, max_tokens=12, logprobs=3))
    result = run_to_end(smol)["lp"]
    entries = result["logprobs"]
    assert "".join(e.token for e in entries) == result["text"]
    for e in entries:
        assert e.raw.decode() == e.token
        assert len(e.top) == 3 and e.top[0].token == e.token and e.top[0].logprob == e.logprob  # greedy
        assert [a.logprob for a in e.top] == sorted((a.logprob for a in e.top), reverse=True)
        assert e.logprob <= 0 and sum(math.exp(a.logprob) for a in e.top) <= 1.0001


def direct_logprobs(engine: Engine, ids: list[int]) -> list[float]:
    """Each token's logprob after those before it, from transformers' own forward pass of the whole prompt."""
    import torch

    with torch.inference_mode():
        model = engine.runner.model
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.mark.model
def test_default_model_prompt_logprobs_are_its_own_preamble_included_and_in_any_batch(smol, monkeypatch):
    submit(smol, job("plain", "What is the capital of France?", temperature=0, max_tokens=6))
    alone = run_to_end(smol)["plain"]["text"]
    # The chat's prompt starts with the template's preamble, whose cached KV would hold no logits:
    # the scoring sequence computes it afresh, in chunks of one block, beside one that reuses it.
    monkeypatch.setattr(smol.scheduler, "step_tokens", 1)
    submit(smol, job("plain", "What is the capital of France?", temperature=0, max_tokens=6))
    submit(smol, job("scored", "Name a colour.", temperature=0, max_tokens=2, prompt_logprobs=2))
    outputs = [o for _ in range(8) for o in smol.step()]
    scored = next(o.prompt_logprobs for o in outputs if o.id == "scored" and o.prompt_logprobs)
    assert "".join(o.text for o in outputs if o.id == "plain") == alone  # the batch changed nothing
    ids = [t.id for t in scored]
    assert ids == smol.runner.encode_chat([ChatMessage("user", "Name a colour.")])
    assert [t.logprob for t in scored[1:]] == pytest.approx(direct_logprobs(smol, ids), abs=1e-4)
    for token in scored[1:]:
        assert token.rank >= 1 and len(token.top) == 2 and token.top[0].logprob >= token.logprob
        assert (token.rank == 1) == (token.top[0].id == token.id)
    usage = {o.id: o.usage.cached_tokens for o in outputs if o.finish}
    assert usage["scored"] == 0 and usage["plain"] > 0


@pytest.mark.model
def test_default_model_completes_raw_text(smol):
    prompt = "The capital of France is"
    submit(smol, completion("c", prompt, temperature=0, max_tokens=8, echo=True))
    result = run_to_end(smol)["c"]
    assert result["text"].startswith(prompt) and len(result["text"]) > len(prompt)
    assert result["usage"] == (len(smol.runner.tokenizer(prompt).input_ids), 8)


@pytest.mark.model
def test_a_prompt_over_the_models_window_is_refused(smol):
    words = " ".join(["word"] * smol.runner.context_window)
    assert refused(smol, completion("long", words)).code == ErrorCode.CONTEXT_LENGTH


@pytest.mark.model
@pytest.mark.parametrize("text", ["巴黎是法国的首都。", "Paris 🇫🇷 is lovely 😀👍", "naïve café — déjà vu"])
def test_streamed_text_is_exact_across_multibyte_characters(smol, text):
    from zmqchat.engine.sequence import Sequence, resolve

    ids = smol.runner.tokenizer(text, add_special_tokens=False).input_ids
    seq = Sequence("x", [1], resolve(SamplingParams(), {}), max_tokens=len(ids) + 1)
    pieces = [smol.detokenizer.append(seq, token) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


@pytest.mark.model
def test_default_model_names_a_token_that_is_part_of_a_character_by_its_bytes(smol):
    from zmqchat.engine.sequence import Sequence, resolve

    ids = smol.runner.tokenizer("Tea 🍵", add_special_tokens=False).input_ids
    seq = Sequence("t", [1], resolve(SamplingParams(logprobs=0), {}), max_tokens=len(ids) + 1)
    for token in ids:
        smol.detokenizer.append(seq, token, (0.0, []))
    entries = smol.detokenizer.take_logprobs(seq)
    assert b"".join(e.raw for e in entries).decode() == "Tea 🍵"  # the bytes rebuild the text, emoji and all
    assert any(e.token.startswith("bytes:\\x") for e in entries)  # the emoji's pieces, named as OpenAI does


# -- the sampler's parts ----------------------------------------------------------------------

def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    import torch

    from zmqchat.engine.sampler import nucleus

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    weights, tokens = nucleus(probs, torch.tensor([0.7, 0.6]))
    kept = [sorted(int(t) for t, w in zip(ts, ws) if w > 0) for ts, ws in zip(tokens, weights)]
    assert kept[0] == [0, 1] and len(kept[1]) == 3  # 0.6 of a uniform four takes any three
    wide = torch.softmax(torch.randn(2, 5000), -1)  # top_p 0.9999 needs more than the candidates
    weights, tokens = nucleus(wide, torch.tensor([0.9999, 0.9999]))
    assert weights.shape[-1] == 5000 and (weights > 0).sum(-1).min() > 1024
    assert torch.allclose(weights.sum(-1), torch.ones(2), atol=1e-3)
    assert nucleus(probs, torch.tensor([1.0, 1.0]))[1] is None  # no filtering: the whole distribution


def test_draws_follow_the_weights_never_take_a_zero_and_repeat_with_a_seed():
    import torch

    from zmqchat.engine.sampler import draw

    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]]).repeat(4000, 1)
    drawn = draw(weights, [None] * len(weights))
    counts = torch.stack([torch.bincount(drawn[row::2], minlength=5) for row in (0, 1)])
    assert counts[0, [0, 2, 4]].sum() == 0 and counts[1, 4] == 0  # weight 0: never
    assert abs(counts[0, 1] / 4000 - 0.75) < 0.03 and (abs(counts[1, :4] / 4000 - 0.25) < 0.03).all()
    seeded = lambda: draw(weights[:2] + 1, [torch.Generator().manual_seed(7), None])[0]  # noqa: E731
    assert len({int(seeded()) for _ in range(5)}) == 1


def test_top_k_keeps_only_each_rows_likeliest():
    import torch

    from zmqchat.engine.sampler import top_k_only

    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    kept = top_k_only(logits, [2, 0])
    assert torch.isinf(kept[0]).tolist() == [True, False, False, True]
    assert torch.equal(kept[1], logits[1])  # 0: no limit


def test_penalties_push_down_what_was_already_said():
    import torch

    from zmqchat.engine.sampler import apply_penalties
    from zmqchat.engine.sequence import Sequence, resolve

    def seq(**params):
        return Sequence("s", [1], resolve(SamplingParams(**params), {}), 10, output_ids=[2, 2, 3])

    logits = torch.zeros(2, 5)
    out = apply_penalties(logits, [seq(frequency_penalty=0.5), seq(presence_penalty=1.0)])
    assert out[0].tolist() == [0.0, 0.0, -1.0, -0.5, 0.0]
    assert out[1].tolist() == [0.0, 0.0, -1.0, -1.0, 0.0]
    assert apply_penalties(logits, [seq(), seq()]) is logits  # nothing to do, nothing copied


def test_logprobs_are_the_models_own_distribution():
    import math

    import torch

    from zmqchat.engine.sampler import token_logprobs

    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0]])
    out = token_logprobs(logits, [0, 0], [1, None])
    assert out[1] is None
    chosen, [(top_id, top_lp)] = out[0]
    assert math.isclose(chosen, math.log(0.25), rel_tol=1e-5) and top_id == 1
    assert math.isclose(top_lp, math.log(0.75), rel_tol=1e-5)


def test_the_choices_of_one_prompt_are_tokenised_once():
    runner = FakeRunner()
    calls = []
    encode = runner.encode_chat
    runner.encode_chat = lambda messages, functions: calls.append(messages) or encode(messages, functions)
    engine = Engine(runner)
    for i in range(16):
        submit(engine, job(f"choice-{i}", "the same prompt for every choice"))
    assert len(calls) == 1
    assert {r["text"] for r in run_to_end(engine).values()} == {"the same prompt for every choice"}


def test_a_prompt_longer_than_the_window_could_hold_is_refused_before_tokenising():
    runner = FakeRunner(context_window=10)
    runner.max_token_chars = 3  # so no prompt over 30 characters can fit
    engine = Engine(runner)
    error = refused(engine, job("huge", "x " * 16))
    assert error.code == ErrorCode.CONTEXT_LENGTH and "32 characters" in error.message
    assert runner.vocab_size == 1  # nothing was tokenised
    submit(engine, job("fits", "x " * 4))  # 8 characters: tokenised and run
    assert run_to_end(engine)["fits"]["text"] == "x x x x "


def test_logit_bias_and_min_tokens_shape_the_logits():
    import torch

    from zmqchat.engine.sampler import apply_biases
    from zmqchat.engine.sequence import Sequence

    def seq(**params) -> Sequence:
        return Sequence("s", [1], SamplingParams(temperature=0.0, top_p=1.0, **params), 8)

    logits = torch.zeros(3, 5)
    young = seq(min_tokens=2)
    grown = seq(min_tokens=2)
    grown.output_ids = [3, 3]
    shaped = apply_biases(logits, [seq(logit_bias={1: 5.0, 4: -100.0}), young, grown], stop_token_ids={0})
    assert shaped[0].tolist() == [0.0, 5.0, 0.0, 0.0, -100.0]
    assert shaped[1, 0] == float("-inf") and shaped[1, 1:].tolist() == [0.0] * 4  # it may not end yet
    assert shaped[2].tolist() == [0.0] * 5  # two tokens in: now it may
    assert logits.tolist() == [[0.0] * 5] * 3  # the runner's logits are left as they were


def test_min_tokens_holds_back_the_end_and_stop_strings(fake):
    submit(fake, job("m", "a STOP b", stop=("STOP",), min_tokens=4))
    result = run_to_end(fake)["m"]
    assert result["text"] == "a STOP b" and result["usage"] == (3, 5)  # a STOP b, two ends it may not take, one it may
