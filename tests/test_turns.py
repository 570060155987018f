"""The bank's lock: granted in arrival order, reentrant, and passed on between a long job's steps."""
import threading

import pytest

from conftest import wait_until

from peftkit.turns import Turns


def test_waiting_threads_run_between_the_steps_of_a_long_holder_in_arrival_order():
    turns, order = Turns(), []

    def short(name):
        with turns:
            with turns:  # reentrant
                order.append(name)
    with turns:
        order.append("long step 1")
        threads = []
        for name in ("first", "second"):
            threads.append(threading.Thread(target=short, args=(name,)))
            threads[-1].start()
            wait_until(lambda: len(turns._waiting) == len(threads))  # queued behind us, in this order
        turns.pass_turn()
        order.append("long step 2")
        turns.pass_turn()  # nobody waiting: returns at once
        order.append("long step 3")
    for thread in threads:
        thread.join()
    assert order == ["long step 1", "first", "second", "long step 2", "long step 3"]


def test_only_the_holder_may_release_or_pass_the_turn():
    turns = Turns()
    with pytest.raises(RuntimeError, match="does not hold"):
        turns.release()
    with pytest.raises(RuntimeError, match="does not hold"):
        turns.pass_turn()
    with turns:
        failed = []
        thread = threading.Thread(target=lambda: failed.append(pytest.raises(RuntimeError, turns.release)))
        thread.start()
        thread.join()
        assert failed


def test_the_waiter_with_the_fewest_turns_goes_first_and_more_served_ones_wait():
    turns, order = Turns(), []

    def job(name, had):
        with turns.turn(had=had):
            order.append(name)
    with turns:
        threads = []
        for name, had in (("long, 9 turns", 9), ("new", 0), ("medium, 3 turns", 3)):
            threads.append(threading.Thread(target=job, args=(name, had)))
            threads[-1].start()
            wait_until(lambda: len(turns._waiting) == len(threads))
        turns.pass_turn(had=5)  # "new" and "medium" have had fewer turns; "long" has had more
        order.append("holder, 5 turns")
    for thread in threads:
        thread.join()
    assert order == ["new", "medium, 3 turns", "holder, 5 turns", "long, 9 turns"]
