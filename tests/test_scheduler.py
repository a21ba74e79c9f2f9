from dataclasses import dataclass

from zmqchat.scheduler import Scheduler


@dataclass(eq=False)
class Seq:
    reserved_tokens: int


def test_admits_up_to_max_batch_in_arrival_order():
    s = Scheduler(max_batch=2, max_tokens=1000)
    a, b, c = Seq(10), Seq(10), Seq(10)
    for seq in (a, b, c):
        s.add(seq)
    assert s.schedule() == [a, b]
    assert s.schedule() == []  # full
    s.remove(a)
    assert s.schedule() == [c] and s.running == [b, c]


def test_padded_batch_stays_within_the_token_budget():
    # The batch is padded to its widest row: 3 rows x 40 = 120 > 100, so the third waits.
    s = Scheduler(max_batch=8, max_tokens=100)
    rows = [Seq(10), Seq(40), Seq(5)]
    for seq in rows:
        s.add(seq)
    assert s.schedule() == rows[:2]
    s.remove(rows[1])
    assert s.schedule() == [rows[2]]


def test_a_wide_request_at_the_head_is_not_overtaken():
    s = Scheduler(max_batch=8, max_tokens=100)
    s.add(Seq(30))
    s.schedule()
    wide, small = Seq(60), Seq(1)
    s.add(wide)
    s.add(small)
    assert s.schedule() == []  # 2 x 60 > 100: `wide` waits, and `small` waits behind it
    s.remove(s.running[0])
    assert s.schedule() == [wide]  # and `small` still waits: 2 rows padded to 60 > 100


def test_cancelled_waiting_sequence_leaves_the_queue():
    s = Scheduler(max_batch=1, max_tokens=100)
    a, b = Seq(1), Seq(1)
    s.add(a)
    s.add(b)
    s.schedule()
    s.remove(b)
    assert len(s) == 1 and list(s.waiting) == []


def test_fits_alone():
    s = Scheduler(max_batch=4, max_tokens=100)
    assert s.fits_alone(Seq(100)) and not s.fits_alone(Seq(101))
