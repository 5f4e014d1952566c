"""Work spread over turns of the event loop: at most so many steps per turn, the rest in order.

A burst of handshakes or a crowd of busy connections would otherwise do all their work
in one turn, while quiet connections wait for it to end.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class Turns:
    """Hands out `per_turn` steps per turn of the event loop; the rest wait in order."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.left = per_turn
        self.waiting: collections.deque[Callable[[], object]] = collections.deque()
        self.armed = False
        # The loop of the first turn asked for: asked once, as get_running_loop() makes a
        # system call (its process id check) each time. Turns serve one loop.
        self.loop: asyncio.AbstractEventLoop | None = None

    def take(self) -> bool:
        """Take a step in this turn if it has room and nothing waits; else False."""
        if self.left and not self.waiting:
            self.left -= 1
            self._arm()
            return True
        return False

    def later(self, step: Callable[[], object]) -> None:
        """Call `step` in the first turn with room, after those already waiting."""
        self.waiting.append(step)
        self._arm()

    async def step(self) -> None:
        """Return once a turn has room for one more step."""
        if self.take():
            return
        waiter = self._loop().create_future()
        self.later(lambda: waiter.done() or waiter.set_result(None))
        await waiter

    def _arm(self) -> None:
        if not self.armed:
            self.armed = True
            self._loop().call_soon(self._next_turn)

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        return loop

    def _next_turn(self) -> None:
        self.armed = False
        self.left = self.per_turn
        while self.left and self.waiting:
            self.left -= 1
            self.waiting.popleft()()
        if self.waiting or self.left < self.per_turn:
            self._arm()
