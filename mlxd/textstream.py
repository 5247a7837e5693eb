"""Token ids -> text deltas, with OpenAI `stop` strings (pure; no MLX).

Decoding is incremental (a window of recent ids is re-decoded, so each step costs
O(1) amortised) and never emits half of a multi-byte character. Text that could be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextStream:
    """Feed generated ids one at a time; collect the text deltas to send."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix_off = 0
        self._read_off = 0
        self._held = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decode_delta(self, final: bool = False) -> str:
        prefix = self._decode(self._ids[self._prefix_off : self._read_off])
        full = self._decode(self._ids[self._prefix_off :])
        if not final and (full.endswith("\ufffd") or len(full) <= len(prefix)):
            return ""  # maybe an incomplete UTF-8 sequence: wait for more ids
        self._prefix_off, self._read_off = self._read_off, len(self._ids)
        return full[len(prefix) :]

    def push(self, token: int) -> str:
        """Add one id; returns the text that may be emitted now ('' if none)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        return self._release(self._held + self._decode_delta(), final=False)

    def flush(self) -> str:
        """At the end of generation: emit what is held back, undecodable bytes included (as U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._held + self._decode_delta(final=True), final=True)

    def _release(self, pending: str, final: bool) -> str:
        cut = min((i for s in self._stop if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(pending[:cut], held="")
        keep = 0 if final else self._partial_stop_len(pending)
        return self._emit(pending[: len(pending) - keep], held=pending[len(pending) - keep :])

    def _emit(self, text: str, held: str) -> str:
        self._held = held
        self.text += text
        return text

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
