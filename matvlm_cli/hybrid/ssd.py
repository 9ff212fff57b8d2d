"""The Mamba-2 maths in plain PyTorch: causal conv, chunked SSD scan and the one-token step.

Each public function has the signature of its mamba_ssm / causal_conv1d counterpart and hands over
to a CUDA kernel of the selected backend when one imports (`matvlm_cli.kernels`). The PyTorch bodies are the reference: they
run anywhere, in any float dtype, and are what the tests check against a naive recurrence.

Shapes: b batch, l length, h heads, p headdim, g groups, n d_state, d channels, w conv width.
Per head h, reading group g(h) = h // (heads / groups):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T        (p x n)
    y_t     = state_t C_t + D * x_t

Packed rows (several records one after another in a row) pass `seq_idx` (b, l): the record each position
belongs to, non-decreasing along a row. Nothing crosses from one record into the next: the conv window
and the state both start again at zero where `seq_idx` changes, as mamba_ssm's kernels do with the same
argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv + SiLU. x (b, d, l), weight (d, w) -> (b, d, l). With `seq_idx` (b, l) a
    position sees only earlier positions of its own record; `cu_seqlens` are the same boundaries over the
    flattened rows (int32, for kernels that take them in that form)."""
    conv1d = kernels.kernel("conv1d", x, packed=seq_idx is not None)
    if conv1d is not None:
        if seq_idx is None:
            return conv1d(x, weight, bias, activation="silu")
        return conv1d(x, weight, bias, activation="silu", seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    width = weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
        return F.silu(out)
    # Tap j reads position t - j, and only from the same record.
    out = x * weight[:, -1:]
    for j in range(1, min(width, x.shape[-1])):
        same = seq_idx[:, j:] == seq_idx[:, :-j]
        tap = (x[..., :-j] * weight[:, width - 1 - j : width - j]).masked_fill(~same.unsqueeze(1), 0)
        out = out + F.pad(tap, (j, 0))
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return F.silu(out)


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One token of the causal conv. x (b, d); conv_state (b, d, w) holds the last w inputs and is
    updated in place (so a static buffer keeps its address for CUDA graphs)."""
    conv1d_update = kernels.kernel("conv1d_update", x)
    if conv1d_update is not None:
        return conv1d_update(x, conv_state, weight, bias, activation="silu")
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state * weight.unsqueeze(0)).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(x.dtype)


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf above the diagonal.

    Summing masked copies instead of subtracting two cumsums keeps exp(out) exact for long chunks.
    """
    length = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, length)  # [..., i, j] = a_i
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    sums = a.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(0)
    return sums.masked_fill(~lower, -torch.inf)


def torch_chunk(length: int, chunk_size: int) -> int:
    """The chunk the PyTorch scan uses: at most `chunk_size`, and smaller, since the result does not depend
    on the chunk and the PyTorch body does work quadratic in it. A kernel keeps the configured chunk.
    fwd+bwd on 2 CPU cores, (b 8, l 181, h 8, p 32, n 32): 44 ms at chunk 128, 21 at 64, 16 at 32; at
    (l 1024, h 32, p 64, n 64) 140, 102, 96 and 175 ms at 128, 64, 32 and 16; the forward of (l 8192, h 32,
    p 64, n 64): 1.07 s at 128, 0.93 at 64, 1.00 at 32, where the recurrence across chunks starts to cost."""
    return min(chunk_size, 32 if length <= 2048 else 64)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD over a whole sequence.

    x (b, l, h, p); dt (b, l, h), already positive (softplus and clamps applied by the caller);
    A (h,); B, C (b, l, g, n); D (h,); initial_states (b, h, p, n), the state before the first record;
    seq_idx (b, l) int, packed records (module docstring).
    Returns y (b, l, h, p) in x's dtype and the final state (b, h, p, n) in float32.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C) + ((D,) if D is not None else ()))
    chunk_scan = kernels.kernel("chunk_scan", x, needs_grad, packed=seq_idx is not None)
    if chunk_scan is not None:
        y, final = chunk_scan(
            x, dt, A, B, C, chunk_size, D=D,
            initial_states=None if initial_states is None else initial_states.float(),
            return_final_states=True, **({} if seq_idx is None else {"seq_idx": seq_idx.to(torch.int32)}),
        )
        return y, final.float()
    out_dtype = x.dtype
    batch, length, heads, _ = x.shape
    chunk_size = torch_chunk(length, chunk_size)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(heads // B.shape[2], dim=2)
    C = C.repeat_interleave(heads // C.shape[2], dim=2)

    # Zero dt on padding makes those steps identities: no decay, no input.
    pad = (-length) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    def to_chunks(t):
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    xdt = to_chunks(x * dt.unsqueeze(-1))  # (b, c, s, h, p)
    B, C = to_chunks(B), to_chunks(C)  # (b, c, s, h, n)
    a = to_chunks(dt * A).permute(0, 3, 1, 2)  # (b, h, c, s)
    a_cum = a.cumsum(dim=-1)

    decay = torch.exp(segment_sum(a))  # (b, h, c, s, s)
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, s)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    decay_in = torch.exp(a_cum)  # (b, h, c, s): from the chunk's start
    if seq_idx is not None:
        # Records are contiguous, so a state carries from one position to a later one exactly when both
        # belong to the same record: every factor that links two positions of different records is zeroed.
        # (b, c, s); the padding belongs to the last record (its steps are identities, see above)
        seq = to_chunks(torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1) if pad else seq_idx)
        ends = torch.cat([seq_idx[:, :1], seq[:, :, -1]], dim=1)  # (b, c+1): the record at each state's position
        decay = decay * (seq.unsqueeze(-1) == seq.unsqueeze(-2)).unsqueeze(1)
        decay_to_end = decay_to_end * (seq == seq[:, :, -1:]).unsqueeze(1)
        chunk_decay = chunk_decay * (ends.unsqueeze(-1) == ends.unsqueeze(-2)).unsqueeze(1)
        decay_in = decay_in * (seq == ends[:, :-1].unsqueeze(-1)).unsqueeze(1)

    # 1. Within each chunk: the quadratic (attention-like) form.
    y_diag = torch.einsum("bcshn,bcthn,bhcst,bcthp->bcshp", C, B, decay, xdt)

    # 2. The state each chunk adds, measured at the chunk's end.
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, decay_to_end, xdt)

    # 3. Across chunks: a short recurrence over chunk boundaries.
    if initial_states is None:
        initial_states = torch.zeros_like(chunk_states[:, 0])
    states = torch.cat([initial_states.to(work).unsqueeze(1), chunk_states], dim=1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. What the state entering each chunk contributes to its outputs.
    y_off = torch.einsum("bcshn,bchpn,bhcs->bcshp", C, states, decay_in)

    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    if D is not None:
        y = y + x[:, :length] * D.to(work)[:, None]
    return y.to(out_dtype), final_state.float() if work != torch.float64 else final_state


def ssd_naive(x, dt, A, B, C, D=None, initial_states=None):
    """Token-by-token recurrence with the same contract as `ssd_chunk_scan`. For tests only."""
    batch, length, heads, headdim = x.shape
    rep = heads // B.shape[2]
    B, C = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    state = (
        torch.zeros(batch, heads, headdim, B.shape[-1], dtype=x.dtype, device=x.device)
        if initial_states is None
        else initial_states.to(x.dtype).clone()
    )
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(2)
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step; updates `state` (b, h, p, n) in place.

    x (b, h, p); dt (b, h), already positive; A, D (h,); B, C (b, g, n). Returns y (b, h, p).
    """
    state_update = kernels.kernel("state_update", x)
    if state_update is not None:
        heads, headdim, d_state = x.shape[1], x.shape[-1], state.shape[-1]
        # Stride-0 views tell the kernel that dt, A and D are shared across headdim.
        return state_update(
            state, x,
            dt.unsqueeze(-1).expand(-1, -1, headdim),
            A[:, None, None].expand(-1, headdim, d_state).float(),
            B, C,
            D=None if D is None else D[:, None].expand(-1, headdim),
            dt_bias=dt.new_zeros(1, 1).expand(heads, headdim),
        )
    rep = x.shape[1] // B.shape[1]
    work = state.dtype
    B = B.repeat_interleave(rep, dim=1).to(work)
    C = C.repeat_interleave(rep, dim=1).to(work)
    dt = dt.to(work)
    decay = torch.exp(dt * A.to(work))[:, :, None, None]
    state.mul_(decay).add_((dt[..., None] * x.to(work)).unsqueeze(-1) * B.unsqueeze(2))
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + D.to(work)[:, None] * x.to(work)
    return y.to(x.dtype)
