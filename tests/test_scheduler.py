"""The scheduler and the KV cache's block accounting on their own: pure, no model."""

import pytest

from zmqchat.engine.kv_cache import BlockManager
from zmqchat.engine.scheduler import Chunk, Scheduler
from zmqchat.engine.sequence import Sequence
from zmqchat.protocol import SamplingParams

SIZE = 4  # tokens per block in these tests


def seq(name: str, prompt: list[int] | int, max_tokens: int = 4, **params) -> Sequence:
    prompt = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Sequence(name, prompt, SamplingParams(**params), max_tokens)


def scheduler(*seqs: Sequence, max_batch: int = 8, blocks: int = 64, step_tokens: int = 64) -> Scheduler:
    s = Scheduler(max_batch, BlockManager(blocks, SIZE), step_tokens)
    for sequence in seqs:
        s.add(sequence)
    return s


def step(s: Scheduler, *tokens: int) -> list[Chunk]:
    """One step: schedule, 'run' it (the sampling sequences get `tokens`, else 7 each), note it computed."""
    batch = s.schedule()
    for sequence, token in zip(batch.sequences, tokens or [7] * len(batch.sequences)):
        sequence.output_ids.append(token)
    s.computed(batch)
    return batch.chunks


def spans(chunks: list[Chunk]) -> list[tuple[str, int, int]]:
    return [(c.seq.id, c.start, c.end) for c in chunks]


# -- the scheduler --------------------------------------------------------------------------------

def test_admits_up_to_max_batch_in_arrival_order_and_a_leaver_makes_room():
    a, b, c = seq("a", 3), seq("b", 3), seq("c", 3)
    s = scheduler(a, b, c, max_batch=2)
    assert spans(step(s)) == [("a", 0, 3), ("b", 0, 3)]
    assert spans(step(s)) == [("a", 3, 4), ("b", 3, 4)]  # each decodes the token it was given
    s.remove(a)
    assert spans(step(s)) == [("b", 4, 5), ("c", 0, 3)]
    assert s.running == [b, c]


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode_every_step():
    a, b = seq("a", 3, max_tokens=20), seq("b", 3, max_tokens=20)
    s = scheduler(a, b, step_tokens=12)
    step(s)
    long = seq("long", 25, max_tokens=2)
    s.add(long)
    batches = [step(s) for _ in range(3)]
    # Two decodes, then the rest of the 12-token budget for the prompt: 10, 10 and its last 5.
    assert [spans(b) for b in batches] == [
        [("a", 3, 4), ("b", 3, 4), ("long", 0, 10)],
        [("a", 4, 5), ("b", 4, 5), ("long", 10, 20)],
        [("a", 5, 6), ("b", 5, 6), ("long", 20, 25)],
    ]
    assert long.output_ids == [7]  # one token: none until its prompt was done
    assert spans(step(s))[-1] == ("long", 25, 26)


def test_prompts_get_a_block_of_room_however_many_sequences_decode():
    decoders = [seq(f"d{i}", 1, max_tokens=20) for i in range(6)]
    s = scheduler(*decoders, step_tokens=4)
    for _ in range(2):
        step(s)
    s.add(seq("new", 9))
    assert spans(step(s))[-1] == ("new", 0, SIZE)


def test_a_request_needing_more_cache_than_is_free_waits_and_is_not_overtaken():
    # 9 usable blocks: "a" holds 4 (12 prompt + 4 tokens), "big" needs 6, "small" would fit in 1.
    a, big, small = seq("a", 12), seq("big", list(range(20))), seq("small", 2, max_tokens=1)
    s = scheduler(a, big, small, blocks=10)
    assert spans(step(s)) == [("a", 0, 12)]
    assert list(s.waiting) == [big, small]
    s.remove(a)
    assert spans(step(s)) == [("big", 0, 20), ("small", 0, 2)]


def test_a_cancelled_sequence_leaves_the_queue_or_the_cache():
    a, b = seq("a", 12), seq("b", 12)
    s = scheduler(a, b, blocks=6)  # 5 usable: one sequence of 4 blocks at a time
    step(s)
    s.remove(b)  # waiting
    assert not s.waiting and s.get("b") is None
    s.remove(a)  # running
    assert s.blocks.in_use == 0 and s.blocks.promised == 0 and len(s) == 0


def test_fits_alone_is_the_whole_cache():
    s = scheduler(blocks=5)
    assert s.fits_alone(seq("x", 12, max_tokens=4)) and not s.fits_alone(seq("y", 13, max_tokens=4))


# -- the blocks -----------------------------------------------------------------------------------

def test_admission_reserves_the_prompt_and_max_tokens_and_release_returns_every_block():
    m = BlockManager(8, SIZE)  # 7 usable
    a = seq("a", 5, max_tokens=6)  # 11 tokens: 3 blocks, 2 for its prompt now, 1 promised
    m.admit(a)
    assert len(a.blocks) == 2 and m.promised == 1 and m.in_use == 2
    assert m.can_admit(seq("b", 8, max_tokens=8)) and not m.can_admit(seq("c", 9, max_tokens=8))
    assert not m.admit(seq("c", 9, max_tokens=8)) and m.in_use == 2 and m.promised == 1  # it took nothing
    m.grow(a, 9)
    assert len(a.blocks) == 3 and m.promised == 0
    with pytest.raises(RuntimeError):
        m.grow(a, 13)  # beyond what it reserved
    m.release(a)
    assert m.in_use == 0 and m.promised == 0 and a.blocks == []


def test_a_prompt_takes_the_cached_blocks_of_the_longest_prefix_it_shares():
    m = BlockManager(16, SIZE)
    a = seq("a", list(range(10)))
    m.admit(a)
    m.computed(a, 10)  # two full blocks are cached now
    shares_9 = seq("b", list(range(9)) + [99, 98])
    m.admit(shares_9)
    assert shares_9.blocks[:2] == a.blocks[:2] and shares_9.cached_tokens == shares_9.computed_tokens == 8
    shares_3 = seq("c", [0, 1, 2, 99, 5, 6])
    m.admit(shares_3)
    assert shares_3.cached_tokens == 0 and set(shares_3.blocks).isdisjoint(a.blocks)


def test_the_last_token_of_a_prompt_is_always_computed():
    m = BlockManager(16, SIZE)
    a = seq("a", list(range(8)))
    m.admit(a)
    m.computed(a, 8)
    again = seq("again", list(range(8)))
    m.admit(again)
    assert again.cached_tokens == 4  # not 8: its last position's logits start the reply


def test_a_finished_conversation_is_cached_with_its_reply_for_its_next_turn():
    m = BlockManager(16, SIZE)
    turn = seq("t1", list(range(6)))
    m.admit(turn)
    m.computed(turn, 6)
    turn.output_ids += [50, 51, 52]
    m.grow(turn, 9)
    m.computed(turn, 9)  # the reply's tokens fed back: 9 tokens computed, two blocks full
    m.release(turn)
    assert m.in_use == 0
    next_turn = seq("t2", list(range(6)) + [50, 51, 52, 60, 61, 62])
    m.admit(next_turn)
    assert next_turn.cached_tokens == 8


def test_cached_blocks_are_evicted_least_recently_released_first_and_uncached_ones_before_them():
    m = BlockManager(8, SIZE)  # blocks 1-7
    old, new = seq("old", list(range(10)), max_tokens=2), seq("new", list(range(20, 30)), max_tokens=2)
    for s in (old, new):
        m.admit(s)
        m.computed(s, 10)  # two full blocks cached each, a third not full
    assert (old.blocks, new.blocks) == ([1, 2, 3], [4, 5, 6])
    m.release(old)
    m.release(new)
    m.admit(seq("x", 13, max_tokens=2))  # 4 blocks: 7 and the two uncached ones, then old's last cached
    assert sorted(m.cached.values()) == [1, 4, 5]
    again = seq("new again", list(range(20, 30)), max_tokens=2)  # 3 blocks: the free ones, 1, 4 and 5
    assert m.admit(again)
    assert again.cached_tokens == 8 and again.blocks[:2] == [4, 5]


def test_a_sequence_scoring_its_prompt_takes_nothing_from_the_cache():
    a = seq("a", 10)
    s = scheduler(a)
    step(s)
    scoring = seq("scoring", 10, prompt_logprobs=1)
    s.add(scoring)
    step(s)
    assert scoring.cached_tokens == 0 and spans(s.schedule().chunks)[-1] == ("scoring", 10, 11)
