"""numpy's ``default_rng(words)`` in pure Python, for the draws the search space makes.

Random search seeds one generator per trial with ``[seed, trial_number]`` and draws each
hyperparameter with ``uniform`` or ``integers``. :class:`SeededRng` reproduces numpy's
``Generator(PCG64(SeedSequence(words)))`` for exactly those calls, bit for bit (a test compares them
over thousands of seeds), so that a search's first suggestion does not wait for ``import numpy``
(about 50 ms of a cold start) and its sequences stay what numpy would draw.

The steps, as numpy implements them: ``SeedSequence`` hashes the words into a pool of four 32-bit
words and draws eight words from it; ``PCG64`` takes them as two 128-bit numbers (state and
increment) and steps a 128-bit linear congruential generator, each output the xor of its state's
halves rotated by its top six bits; ``uniform`` scales the top 53 bits of one output, ``integers``
uses Lemire's bounded method (on 32-bit halves of an output where the range fits in 32 bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["SeededRng"]

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1

# numpy/random/bit_generator.pyx (SeedSequence)
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL_SIZE = 4

# numpy/random/src/pcg64 (the default 128-bit multiplier)
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341


def _words(value: int) -> list[int]:
    """An entropy integer as numpy splits it: 32-bit words, least significant first."""
    if value < 0:
        raise ValueError(f"seed words must be non-negative, got {value}")
    if value == 0:
        return [0]
    out = []
    while value:
        out.append(value & _M32)
        value >>= 32
    return out


def _seed_state(entropy: Iterable[int]) -> list[int]:
    """``SeedSequence(entropy).generate_state(8)``: eight 32-bit words."""
    words = [w for value in entropy for w in _words(int(value))]
    hash_const = _INIT_A

    def hashmix(value: int) -> int:
        nonlocal hash_const
        value ^= hash_const
        hash_const = (hash_const * _MULT_A) & _M32
        value = (value * hash_const) & _M32
        return value ^ (value >> 16)

    def mix(x: int, y: int) -> int:
        result = (_MIX_MULT_L * x - _MIX_MULT_R * y) & _M32
        return result ^ (result >> 16)

    pool = [hashmix(words[i] if i < len(words) else 0) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL_SIZE, len(words)):
        for dst in range(_POOL_SIZE):
            pool[dst] = mix(pool[dst], hashmix(words[src]))

    state, const = [], _INIT_B
    for i in range(8):
        value = pool[i % _POOL_SIZE] ^ const
        const = (const * _MULT_B) & _M32
        value = (value * const) & _M32
        state.append(value ^ (value >> 16))
    return state


class SeededRng:
    """What ``numpy.random.default_rng(entropy)`` draws with ``uniform(low, high)`` and
    ``integers(low, high)`` (scalars), without numpy. ``entropy`` is a sequence of non-negative ints."""

    __slots__ = ("_state", "_inc", "_half")

    def __init__(self, entropy: Iterable[int]) -> None:
        w = _seed_state(entropy)
        # generate_state(4, uint64): little-endian pairs; PCG64 seeds (state, inc) from (v0:v1, v2:v3)
        v = [w[2 * i] | (w[2 * i + 1] << 32) for i in range(4)]
        seed, inc = (v[0] << 64) | v[1], (v[2] << 64) | v[3]
        self._inc = ((inc << 1) | 1) & _M128
        self._state = self._inc  # srandom: state 0, one step, add the seed, one step
        self._state = (self._state + seed) & _M128
        self._state = (self._state * _PCG_MULT + self._inc) & _M128
        self._half: int | None = None  # the upper half of an output of which next32 used the lower

    def _next64(self) -> int:
        state = self._state = (self._state * _PCG_MULT + self._inc) & _M128
        value, rot = ((state >> 64) ^ state) & _M64, state >> 122
        return ((value >> rot) | (value << (64 - rot))) & _M64

    def _next32(self) -> int:
        if self._half is not None:
            half, self._half = self._half, None
            return half
        value = self._next64()
        self._half = value >> 32
        return value & _M32

    def random(self) -> float:
        """A float in [0, 1), as ``Generator.random()``."""
        return (self._next64() >> 11) * (1.0 / 9007199254740992.0)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        """As ``Generator.uniform(low, high)`` with scalar bounds."""
        low, high = float(low), float(high)
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int | None = None) -> int:
        """As ``Generator.integers(low, high)`` (``high`` excluded; ``integers(n)`` draws from [0, n))."""
        if high is None:
            low, high = 0, low
        low, high = int(low), int(high)
        if high <= low:
            raise ValueError(f"high <= low: integers({low}, {high})")
        span = high - 1 - low  # numpy's rng: the inclusive range's width
        if span > _M64:
            raise ValueError(f"integers({low}, {high}): the range exceeds 64 bits")
        if span == 0:
            return low
        if span <= _M32:
            if span == _M32:
                return low + self._next32()
            return low + self._lemire(span, 32, self._next32)
        if span == _M64:
            return low + self._next64()
        return low + self._lemire(span, 64, self._next64)

    @staticmethod
    def _lemire(span: int, bits: int, draw: Callable[[], int]) -> int:
        mask = (1 << bits) - 1
        excl = span + 1
        m = draw() * excl
        leftover = m & mask
        if leftover < excl:
            threshold = (mask - span) % excl
            while leftover < threshold:
                m = draw() * excl
                leftover = m & mask
        return m >> bits
