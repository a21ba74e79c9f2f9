"""The scheduler on its own: admission, and the Batch each step hands the runner."""

from dataclasses import dataclass

from zmqchat.engine.scheduler import Scheduler


@dataclass(eq=False)
class Seq:
    id: str
    reserved_tokens: int


def scheduler(max_batch: int, max_tokens: int, *widths: int) -> tuple[Scheduler, list[Seq]]:
    s = Scheduler(max_batch=max_batch, max_tokens=max_tokens)
    seqs = [Seq(f"s{i}", w) for i, w in enumerate(widths)]
    for seq in seqs:
        s.add(seq)
    return s, seqs


def test_admits_up_to_max_batch_in_arrival_order():
    s, (a, b, c) = scheduler(2, 1000, 10, 10, 10)
    batch = s.schedule()
    assert batch.sequences == [a, b] and batch.new == [a, b] and batch.kept == []
    batch = s.schedule()  # full
    assert batch.sequences == [a, b] and batch.new == [] and batch.kept == [0, 1]
    s.remove(a)
    batch = s.schedule()
    assert batch.new == [c] and batch.sequences == [b, c] and s.running == [b, c]


def test_the_batch_keeps_cache_row_order_and_says_which_rows_stay():
    s, (a, b, c, d) = scheduler(3, 1000, 10, 10, 10, 10)
    s.schedule()
    s.remove(b)  # the middle row leaves; d joins at the end
    batch = s.schedule()
    assert batch.kept == [0, 2] and batch.decoding == [a, c] and batch.new == [d]
    assert batch.sequences == [a, c, d]
    s.remove(a)
    s.remove(c)
    s.remove(d)
    batch = s.schedule()
    assert batch.sequences == [] and batch.kept == [] and batch.new == []


def test_a_sequence_leaving_and_an_other_with_its_id_joining_is_not_kept():
    s, (a,) = scheduler(2, 1000, 10)
    s.schedule()
    s.remove(a)
    again = Seq("s0", 10)
    s.add(again)
    batch = s.schedule()
    assert batch.kept == [] and batch.new == [again]


def test_padded_batch_stays_within_the_token_budget():
    # The batch is padded to its widest row: 3 rows x 40 = 120 > 100, so the third waits.
    s, rows = scheduler(8, 100, 10, 40, 5)
    assert s.schedule().new == rows[:2]
    s.remove(rows[1])
    assert s.schedule().new == [rows[2]]


def test_a_wide_request_at_the_head_is_not_overtaken():
    s, (first,) = scheduler(8, 100, 30)
    s.schedule()
    wide, small = Seq("wide", 60), Seq("small", 1)
    s.add(wide)
    s.add(small)
    assert s.schedule().new == []  # 2 x 60 > 100: `wide` waits, and `small` waits behind it
    s.remove(first)
    assert s.schedule().new == [wide]  # and `small` still waits: 2 rows padded to 60 > 100


def test_cancelled_waiting_sequence_leaves_the_queue_and_the_index():
    s, (a, b) = scheduler(1, 100, 1, 1)
    s.schedule()
    s.remove(b)
    assert len(s) == 1 and list(s.waiting) == [] and s.get("s1") is None and s.get("s0") is a


def test_fits_alone():
    s = Scheduler(max_batch=4, max_tokens=100)
    assert s.fits_alone(Seq("a", 100)) and not s.fits_alone(Seq("b", 101))
