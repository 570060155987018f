"""Turns: the model's lock, granted to the waiting thread that has had the fewest turns so far.

    with bank.lock.turn(had=0):    # a new batch
        run_one_step()
        bank.lock.pass_turn(had=1)  # let anyone who has had fewer (or as many) turns go first

A server's requests share one model. With a plain lock, whoever holds it keeps it for as long
as it likes (a 200-token generation, 50 long contexts) while every other client waits, and the
OS decides who wins the next acquire. Here a batch hands the lock on between its steps, and
the lock goes to the waiter that has had the fewest turns (least attained service; the earliest
asker among equals). A new small request therefore runs its few steps as soon as the step under
way ends, while long ones alternate step by step; none waits for a whole long one. threading has
no such lock, hence this one.
"""
import bisect
import threading
from contextlib import contextmanager


class Turns:
    def __init__(self):
        self._changed = threading.Condition(threading.Lock())
        self._waiting = []  # (turns had, arrival number) of each waiting thread, sorted: the first goes next
        self._arrivals = 0
        self._owner = None
        self._depth = 0

    def acquire(self, had: int = 0) -> None:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return
            self._wait_for_turn(had)
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._changed:
            self._check_owner("release")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._changed.notify_all()

    def pass_turn(self, had: int = 0) -> None:
        """Between two steps of a job that has had `had` turns: let every waiter that has had no
        more go first, then take the lock back at the same depth."""
        with self._changed:
            self._check_owner("pass_turn")
            if not self._waiting or self._waiting[0][0] > had:
                return  # nobody waiting has had fewer turns
            depth, self._owner, self._depth = self._depth, None, 0
            self._changed.notify_all()
            self._wait_for_turn(had)
            self._owner, self._depth = threading.get_ident(), depth

    @contextmanager
    def turn(self, had: int = 0):
        self.acquire(had)
        try:
            yield self
        finally:
            self.release()

    def _wait_for_turn(self, had: int) -> None:
        place = (had, self._arrivals)
        self._arrivals += 1
        bisect.insort(self._waiting, place)
        self._changed.wait_for(lambda: self._owner is None and self._waiting[0] == place)
        self._waiting.pop(0)

    def _check_owner(self, what: str) -> None:
        if self._owner != threading.get_ident():
            raise RuntimeError(f"Turns.{what} by a thread that does not hold the lock")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
