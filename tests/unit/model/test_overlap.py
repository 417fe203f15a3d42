"""An overlapping instance's head (on the caller's thread) and tail thread, on the CPU, with a chain whose tail can be held."""

import threading

import pytest

from tritonpipe.model.overlap import DEPTH, Flight, Overlap
from tritonpipe.stages.base import ERROR

WAIT = 5.0


class HeldChain:
    """A runtime stand-in: the head doubles ``x``, the tail adds one and can be held at a gate."""

    def __init__(self):
        self.tail_gate = threading.Event()
        self.tail_gate.set()
        self.in_tail = threading.Semaphore(0)
        self.fail_head = False
        self.log: list[tuple[str, int]] = []

    def halves(self):
        return ["head"], ["tail"]

    def run_head(self, items):
        if self.fail_head:
            raise RuntimeError("the head broke")
        for item in items:
            if item["x"] < 0:
                item[ERROR] = ValueError("negative")
            else:
                item["data"] = item["x"] * 2
        self.log.append(("head", items[0]["x"]))

    def run_tail(self, items):
        self.in_tail.release()
        assert self.tail_gate.wait(WAIT)
        for item in items:
            if ERROR not in item:
                item["data"] += 1
        self.log.append(("tail", items[0]["x"]))

    def responses(self, items):
        return [item[ERROR] if ERROR in item else {"y": item["data"]} for item in items]


class Answers:
    def __init__(self):
        self.got: dict[str, object] = {}
        self.done = threading.Condition()

    def __call__(self, flight, results):
        if isinstance(results, BaseException):
            results = [results] * len(flight.senders)
        with self.done:
            for sender, result in zip(flight.senders, results):
                assert sender not in self.got, f"{sender} answered twice"
                self.got[sender] = result
            self.done.notify_all()

    def wait_for(self, count: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.got) >= count, WAIT)


def flight(*values, name="r"):
    return Flight([{"x": v} for v in values], [f"{name}{v}" for v in values])


def execute(overlap, one: Flight) -> float:
    """What the generic model's execute does with a batch: the head here, then the tail thread."""
    overlap.run_head(one)
    return overlap.submit(one)


@pytest.fixture
def chain():
    return HeldChain()


@pytest.fixture
def answers():
    return Answers()


def test_every_request_answered_once_in_its_own_result(chain, answers):
    recorded = []
    overlap = Overlap(chain, None, answers, record=lambda f, times: recorded.append(len(f.senders)))
    for start in range(0, 12, 3):
        execute(overlap, flight(start, start + 1, start + 2))
    answers.wait_for(12)
    overlap.close()
    assert not overlap.in_flight  # what a timed-out instance would still answer on its way out
    assert answers.got == {f"r{v}": {"y": 2 * v + 1} for v in range(12)}
    assert sorted(recorded) == [3, 3, 3, 3]


def test_head_takes_the_next_batch_while_the_tail_holds_one(chain, answers):
    overlap = Overlap(chain, None, answers)
    chain.tail_gate.clear()
    execute(overlap, flight(1))
    assert chain.in_tail.acquire(timeout=WAIT)  # batch 1 is in the tail, held
    overlap.run_head(second := flight(2))
    assert len(overlap.in_flight) == 2
    assert ("head", 2) in chain.log and ("tail", 1) not in chain.log  # batch 2's head ran while batch 1 is held
    waiting = threading.Thread(target=overlap.submit, args=(second,))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # execute waits for the tail, and Triton's queue gathers a larger batch
    chain.tail_gate.set()
    waiting.join(WAIT)
    answers.wait_for(2)
    overlap.close()
    assert chain.log.index(("tail", 1)) < chain.log.index(("tail", 2))  # answered in the order they came


def test_a_bad_item_fails_alone(chain, answers):
    overlap = Overlap(chain, None, answers)
    execute(overlap, flight(3, -1, 4))
    answers.wait_for(3)
    overlap.close()
    assert answers.got["r3"] == {"y": 7} and answers.got["r4"] == {"y": 9}
    assert isinstance(answers.got["r-1"], ValueError)


def test_a_failed_head_answers_its_whole_batch_and_the_next_batch_is_served(chain, answers):
    overlap = Overlap(chain, None, answers)
    chain.fail_head = True
    execute(overlap, flight(1, 2))
    answers.wait_for(2)
    assert all(isinstance(answers.got[f"r{v}"], RuntimeError) for v in (1, 2))
    chain.fail_head = False
    execute(overlap, flight(5))
    answers.wait_for(3)
    overlap.close()
    assert answers.got["r5"] == {"y": 11}


def test_a_failing_answer_frees_its_slot(chain):
    calls = []

    def answer(flight, results):
        calls.append(flight)
        if len(calls) == 1:
            raise RuntimeError("the client went away")

    overlap = Overlap(chain, None, answer)
    for value in range(DEPTH + 2):
        execute(overlap, flight(value))  # would block for good if the first failure kept its slot
    overlap.close()
    assert len(calls) == DEPTH + 2


def test_the_tail_thread_watches_the_batch_it_is_on(chain, answers):
    watched = []

    class Guard:
        def watch(self, context):
            watched.append((threading.current_thread().name, context))
            return threading.Lock()  # any context manager

    overlap = Overlap(chain, None, answers, watchdog=Guard())
    one = flight(1)
    execute(overlap, one)
    answers.wait_for(1)
    overlap.close()
    assert watched == [("tritonpipe-tail", one)]
