"""The eager step's blocks: tensors grouped (and large ones split) into runs of about a fixed
number of elements, so that a step's dozen foreach ops run on one block before the next.

On a CPU a block's temporaries then stay in cache between ops, which makes the dozen passes of a
step cost about as much as torch's eight over whole tensors. On CUDA blocks are large (kernel
launches dominate). DDP's gradient all-reduce groups its collectives the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Optional

from torch import Tensor

from lightning_mp.optim import quant
from lightning_mp.storage import local

# Elements stepped at once by the eager path: on a CPU 2 MiB of FP32 per temporary, which stays in
# cache across a step's ops; elsewhere 64 MiB, which bounds the step's temporaries.
BLOCK_NUMEL = {"cpu": 1 << 19, "cuda": 1 << 24}


def block_numel(device_type: str) -> int:
    return BLOCK_NUMEL.get(device_type, BLOCK_NUMEL["cuda"])


class Piece(NamedTuple):
    """Elements ``start:stop`` of a parameter (and of its grad and state), or all of it (``start`` None)."""

    param: Tensor
    start: Optional[int] = None
    stop: Optional[int] = None

    def of(self, t: Tensor) -> Tensor:
        t = local(t)
        return t if self.start is None else t.view(-1)[self.start : self.stop]

    def scales(self, scales: Tensor) -> Tensor:
        """The 8-bit block scales of these elements (pieces start on a quantization block's boundary)."""
        if self.start is None:
            return scales
        return scales[self.start // quant.BLOCK : quant.blocks(self.stop)]


def blocks(tensors: list[Tensor], numel: int, grads: Optional[dict[Tensor, Tensor]] = None) -> Iterable[list[Piece]]:
    """``tensors`` grouped into blocks of about ``numel`` elements, large contiguous ones (whose
    gradient, in ``grads`` or ``.grad``, is contiguous too) split into pieces."""
    block: list[Piece] = []
    size_of_block = 0
    for p in tensors:
        n = local(p).numel()
        grad = (grads or {}).get(p, p.grad)
        whole = n <= numel or not (local(p).is_contiguous() and (grad is None or local(grad).is_contiguous()))
        pieces = [Piece(p)] if whole else [Piece(p, s, min(s + numel, n)) for s in range(0, n, numel)]
        for piece in pieces:
            size = n if piece.start is None else piece.stop - piece.start
            if block and size_of_block + size > numel:
                yield block
                block, size_of_block = [], 0
            block.append(piece)
            size_of_block += size
    if block:
        yield block
