"""Turns: a reentrant lock granted in arrival order, which its holder can pass on for a moment.

    with bank.lock:            # waits behind every thread that asked before
        run_one_batch_step()
        bank.lock.pass_turn()  # let everyone who is waiting run one step, then continue

A server's requests share one model. With a plain lock, whoever holds it keeps it for as long
as it likes (a 200-token generation, 50 long contexts) while every other client waits; the OS
decides who wins the next acquire. Here each acquire takes a ticket and tickets are served in
order, and a long job calls pass_turn() between its steps, so a small request waits at most for
the one step each job ahead of it is running. threading has no fair lock, hence this one.
"""
import threading


class Turns:
    def __init__(self):
        self._changed = threading.Condition(threading.Lock())
        self._next_ticket = 0  # handed to the next thread that asks
        self._serving = 0  # the ticket whose holder may take the lock next
        self._owner = None
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return
            ticket = self._take_ticket()
            self._changed.wait_for(lambda: self._serving == ticket)
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._changed:
            if self._owner != threading.get_ident():
                raise RuntimeError("Turns.release by a thread that does not hold the lock")
            self._depth -= 1
            if self._depth == 0:
                self._hand_on()

    def pass_turn(self) -> None:
        """Let every thread already waiting have its turn, then take the lock back (at the same depth)."""
        with self._changed:
            if self._owner != threading.get_ident():
                raise RuntimeError("Turns.pass_turn by a thread that does not hold the lock")
            if self._next_ticket == self._serving + 1:
                return  # nobody is waiting
            depth = self._depth
            ticket = self._take_ticket()  # at the back of the line
            self._hand_on()
            self._changed.wait_for(lambda: self._serving == ticket)
            self._owner, self._depth = threading.get_ident(), depth

    def _hand_on(self) -> None:
        self._owner, self._depth = None, 0
        self._serving += 1
        self._changed.notify_all()

    def _take_ticket(self) -> int:
        self._next_ticket += 1
        return self._next_ticket - 1

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
