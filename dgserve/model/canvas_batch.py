"""The fast path's batch layout: S rows of C tokens (C = the canvas length), every tensor shaped by the bucket.

A row is one canvas being denoised, one committed canvas being encoded, one prefill chunk of at most C tokens,
or padding. Attention reads each row's cached prefix from the paged KV through a gather of fixed width (a
window for sliding layers, a context bucket for full layers) and writes the row's own K/V through a slot
mapping. Everything is built on the device from small per-row descriptors with tensor ops only: no Python
loop over rows, no host synchronisation, the same shapes every step of a bucket (so a forward can be compiled
once per bucket and captured in a CUDA graph).

Masks are the reference's: a denoise row sees its canvas bidirectionally plus the cached prefix (sliding
layers: the last ``window - 1`` cached positions); an encode row is causal, and in sliding layers each token
sees only the ``window`` positions ending at itself (a per-token window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowDescriptors:
    """Per-row facts the host knows, on the device (``[S]`` unless noted)."""

    prefix_len: torch.Tensor  # cached positions [0, prefix_len) the row attends to; its tokens start there
    length: torch.Tensor  # valid tokens of the row (C for canvases; a prefill chunk may be shorter)
    encode: torch.Tensor  # bool: causal, writes its K/V (prefill chunks, committed canvases)
    full_table: torch.Tensor  # [S, NBf] full-space block ids of positions [0, NBf * bs); -1 = none
    sliding_table: torch.Tensor  # [S, NBs] sliding-space block ids from block sliding_base; -1 = none
    sliding_base: torch.Tensor  # first block index of sliding_table
    full_write: torch.Tensor  # [S, WB] full-space block ids from block prefix_len // bs (where the row writes)
    sliding_write: torch.Tensor  # [S, WB] sliding-space block ids from block prefix_len // bs


@dataclass
class AttnLayout:
    """What one layer type's attention needs for a forward."""

    gather: torch.Tensor  # [S, P] slots of the cached prefix keys (masked positions point at scratch)
    mask: torch.Tensor  # [S, 1, group * C, P + C] additive (0 or the dtype's lowest): query heads of one KV head
    # folded into the rows; additive in the model's dtype, so attention does not convert a bool mask per layer
    write: torch.Tensor  # [S * C] slots for this forward's K/V (scratch for rows and tokens that keep none)


@dataclass
class CanvasBatch:
    """The model inputs of one fast-path forward."""

    tokens: torch.Tensor  # [S, C]
    positions: torch.Tensor  # [S, C] absolute positions
    denoise: torch.Tensor  # [S] bool: self-conditioned canvas rows (their hidden states feed the sampler)
    soft: torch.Tensor  # [S, C, H] previous step's soft embeddings (zeros at a canvas' first step)
    layouts: dict[str, AttnLayout]  # layer type -> layout


def sliding_blocks(window: int, block_size: int) -> int:
    """Blocks a sliding layer's gather spans: ``window - 1`` cached positions on any block alignment."""
    return -(-(window - 1 + block_size - 1) // block_size)


def write_blocks(canvas: int, block_size: int) -> int:
    """Blocks a row's writes span: ``canvas`` positions on any block alignment."""
    return -(-(canvas + block_size - 1) // block_size)


def attn_layout(rows: RowDescriptors, *, table: torch.Tensor, base_block: torch.Tensor, writes: torch.Tensor,
                canvas: int, block_size: int, window: int | None, scratch_slot: int, group: int,
                dtype: torch.dtype) -> AttnLayout:
    """The gather, mask and write slots of one page space (``window`` None: full attention)."""
    s, nb = table.shape
    device = table.device
    p = nb * block_size
    offs = torch.arange(p, device=device)  # [P]
    blk = table.index_select(1, offs // block_size)  # [S, P]
    pos = base_block[:, None] * block_size + offs[None, :]  # [S, P] absolute position of each gathered key
    prefix = rows.prefix_len[:, None]
    start = (prefix - (window - 1)).clamp(min=0) if window is not None else torch.zeros_like(prefix)
    valid = (blk >= 0) & (pos < prefix) & (pos >= start)  # [S, P]
    gather = torch.where(valid, blk * block_size + offs[None, :] % block_size, scratch_slot)
    j = torch.arange(canvas, device=device)
    encode = rows.encode[:, None, None]  # [S, 1, 1]
    q_pos = prefix + j[None, :]  # [S, C]
    prefix_mask = valid[:, None, :].expand(s, canvas, p)  # [S, C(q), P]
    if window is not None:
        prefix_mask = prefix_mask & (~encode | (pos[:, None, :] > q_pos[:, :, None] - window))
    key_ok = (j[None, :] < rows.length[:, None])[:, None, :]  # [S, 1, C(k)]
    causal = j[None, None, :] <= j[None, :, None]  # [1, C(q), C(k)]
    if window is not None:
        causal = causal & (j[None, None, :] > j[None, :, None] - window)
    self_mask = key_ok & (~encode | causal)  # [S, C, C]
    allowed = torch.cat([prefix_mask, self_mask], dim=-1)  # [S, C, P + C]
    mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    mask = mask[:, None].expand(s, group, canvas, p + canvas).reshape(s, 1, group * canvas, p + canvas)
    # writes: token j of row s lands at position prefix_len + j
    wpos = q_pos  # [S, C]
    first = rows.prefix_len // block_size
    wcol = (wpos // block_size - first[:, None]).clamp(0, writes.shape[1] - 1)
    wblk = writes.gather(1, wcol)
    keep = rows.encode[:, None] & (j[None, :] < rows.length[:, None]) & (wblk >= 0)
    write = torch.where(keep, wblk * block_size + wpos % block_size, scratch_slot + j[None, :])
    return AttnLayout(gather=gather, mask=mask, write=write.reshape(-1))
