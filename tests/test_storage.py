"""The 16-bit storage primitives: exact split/join, unbiased stochastic rounding, Kahan storage."""

from __future__ import annotations

import pytest
import torch

from lightning_mp.storage import compensate_, join_, split_, stochastic_round_, uncompensate_

BF16 = torch.bfloat16


def _patterns(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


EDGES = [
    0x00000000, 0x80000000,  # +-0
    0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x0000FFFF, 0x007FFFFF,  # subnormals
    0x00800000, 0x3F800000, 0xBF800000,  # min normal, +-1
    0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # exact ties, even and odd high half
    0x3F807FFF, 0x3F80FFFF, 0x7F7F7FFF, 0x7F7FFFFF, 0xFF7FFFFF,  # just below ties, largest finite
]


def _all_cases(n_random: int = 4_000_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    random = torch.randint(-(2**31), 2**31 - 1, (n_random,), generator=g, dtype=torch.int64)
    bits = torch.cat([torch.tensor(EDGES, dtype=torch.int64), random])
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    x = _patterns(bits)
    return x[torch.isfinite(x)]


def test_split_join_round_trip_is_exact_for_every_finite_pattern():
    x = _all_cases()
    assert x.numel() > 3_900_000
    hi, lo, back = torch.empty_like(x, dtype=BF16), torch.empty_like(x, dtype=torch.int16), torch.empty_like(x)
    split_([x.clone()], [hi], [lo])
    join_([back], [hi], [lo])
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


def test_split_rounds_to_nearest_with_ties_away_from_zero():
    x = _all_cases(1_000_000)
    hi, lo = torch.empty_like(x, dtype=BF16), torch.empty_like(x, dtype=torch.int16)
    split_([x.clone()], [hi], [lo])
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign, magnitude = bits & 0x80000000, bits & 0x7FFFFFFF
    expected = (sign | ((magnitude + 0x8000) >> 16 << 16)).to(torch.int64)
    got = hi.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, expected)
    not_tie = (bits & 0xFFFF) != 0x8000  # away from ties it is torch's own rounding
    assert torch.equal(hi[not_tie], x[not_tie].to(BF16))
    # the four ties of EDGES go away from zero: 1 + 2**-8 -> 1 + 2**-7, and so on
    ties = _patterns(torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000]))
    h = torch.empty(4, dtype=BF16)
    split_([ties.clone()], [h], [torch.empty(4, dtype=torch.int16)])
    assert h.float().tolist() == [1 + 2**-7, 1 + 2**-6, -(1 + 2**-7), -(1 + 2**-6)]


def test_stochastic_rounding_is_unbiased_with_the_exact_probability():
    n = 1_000_000
    g = torch.Generator().manual_seed(1)
    # 1 + 2**-9 is a quarter of the way from 1 to the next bf16 value 1 + 2**-7
    for value, up, p_up in [(1 + 2**-9, 1 + 2**-7, 0.25), (-(1 + 3 * 2**-9), -(1 + 2**-7), 0.75)]:
        out = torch.empty(n, dtype=BF16)
        stochastic_round_([torch.full((n,), value)], [out], g)
        frac = (out.float() == up).float().mean().item()
        assert abs(frac - p_up) < 5 * (p_up * (1 - p_up) / n) ** 0.5
        assert abs(out.float().mean().item() - value) < 2e-5
        assert set(out.float().unique().tolist()) <= {up, (1.0 if value > 0 else -1.0)}


def test_stochastic_rounding_near_zero_and_reproducible():
    x = _patterns(torch.tensor([0, 0x80000000, 1, 0x80000001, 0x00007FFF, 0x8000FFFF] * 1000))
    a, b = torch.empty_like(x, dtype=BF16), torch.empty_like(x, dtype=BF16)
    stochastic_round_([x.clone()], [a], torch.Generator().manual_seed(3))
    stochastic_round_([x.clone()], [b], torch.Generator().manual_seed(3))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))  # same seed, same rounding
    assert torch.isfinite(a.float()).all()
    assert torch.equal(torch.signbit(a.float()), torch.signbit(x))  # signs kept, zeros stay signed zeros
    assert (a.float().abs() <= 2 ** -126 * 2**-7 * 2).all()  # tiny values round to 0 or the next bf16 subnormal


def test_kahan_storage_keeps_twice_the_bf16_significand():
    x = torch.randn(100_000) * 3
    w, c, back = torch.empty_like(x, dtype=BF16), torch.empty_like(x, dtype=BF16), torch.empty_like(x)
    compensate_([x.clone()], [w], [c])
    assert torch.equal(w, x.to(BF16))  # the weight is the nearest bf16 value
    uncompensate_([back], [w], [c])
    # the residual (< 2**-8 |x|) is kept to bf16's 8 bits: the error is below 2**-16 |x|
    assert ((back - x).abs() <= x.abs() * 2**-16).all()
    assert ((back - x).abs().max() < (w.float() - x).abs().max() / 100)


@pytest.mark.slow
def test_remainder_split_and_join_are_exact_for_every_float32_bit_pattern():
    """All 2**32 patterns, NaN payloads, infinities, subnormals and -0.0 included, go through the
    split into a bf16 weight and an int16 remainder and back bit for bit (Apex's remainder scheme
    has a reported lossy case, apex issue 1842). About 30 s on 2 CPU cores."""
    chunk = 1 << 25
    bits = torch.empty(chunk, dtype=torch.int32)
    values = torch.empty(chunk, dtype=torch.float32)
    weights = torch.empty(chunk, dtype=torch.bfloat16)
    remainders = torch.empty(chunk, dtype=torch.int16)
    joined = torch.empty(chunk, dtype=torch.float32)
    for start in range(-(2**31), 2**31, chunk):
        torch.arange(start, start + chunk, dtype=torch.int32, out=bits)
        values.view(torch.int32).copy_(bits)
        split_([values], [weights], [remainders])
        join_([joined], [weights], [remainders])
        wrong = torch.ne(joined.view(torch.int32), bits)
        assert not wrong.any(), f"{int(wrong.sum())} patterns from {start:#x} are not kept, e.g. {int(bits[wrong][0]):#x}"
