"""The chunked SSD scan and the decoding step against a naive token-by-token recurrence."""

import pytest
import torch
import torch.nn.functional as F

from matvlm_cli.hybrid.ssd import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_naive, ssd_step


def random_inputs(batch, length, heads, headdim, groups, d_state, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, headdim, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, heads, generator=g, dtype=dtype) - 1)
    A = -torch.rand(heads, generator=g, dtype=dtype) * 4 - 0.5
    B = torch.randn(batch, length, groups, d_state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, groups, d_state, generator=g, dtype=dtype)
    D = torch.randn(heads, generator=g, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize(
    "batch,length,heads,headdim,groups,d_state,chunk",
    [
        (2, 64, 4, 8, 4, 16, 16),  # exact multiple of the chunk
        (1, 37, 4, 8, 2, 8, 16),  # ragged length, ngroups < nheads
        (3, 5, 6, 4, 1, 8, 8),  # shorter than one chunk, a single group
        (2, 100, 8, 16, 4, 16, 32),
    ],
)
def test_chunked_scan_equals_recurrence(batch, length, heads, headdim, groups, d_state, chunk):
    x, dt, A, B, C, D = random_inputs(batch, length, heads, headdim, groups, d_state)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk, D=D)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D)
    assert torch.allclose(y, y_ref, atol=1e-9, rtol=1e-9)
    assert torch.allclose(final, final_ref, atol=1e-9, rtol=1e-9)


def test_initial_state_continues_a_sequence():
    x, dt, A, B, C, D = random_inputs(2, 50, 4, 8, 2, 8, seed=3)
    y_full, final_full = ssd_chunk_scan(x, dt, A, B, C, 16, D=D)
    y1, state = ssd_chunk_scan(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], 16, D=D)
    y2, final = ssd_chunk_scan(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], 16, D=D, initial_states=state)
    assert torch.allclose(torch.cat([y1, y2], 1), y_full, atol=1e-9)
    assert torch.allclose(final, final_full, atol=1e-9)


def test_step_equals_recurrence():
    x, dt, A, B, C, D = random_inputs(2, 12, 6, 4, 3, 8, seed=5)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D)
    state = torch.zeros(2, 6, 4, 8, dtype=torch.float64)
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(12)]
    assert torch.allclose(torch.stack(ys, 1), y_ref, atol=1e-10)
    assert torch.allclose(state, final_ref, atol=1e-10)


def test_float32_scan_is_close_to_float64():
    x, dt, A, B, C, D = random_inputs(1, 300, 4, 8, 4, 8, seed=7)
    y64, _ = ssd_chunk_scan(x, dt, A, B, C, 64, D=D)
    y32, _ = ssd_chunk_scan(*(t.float() for t in (x, dt, A, B, C)), 64, D=D.float())
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), y64, atol=1e-4, rtol=1e-4)


def test_conv_step_equals_causal_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    full = causal_conv1d(x, weight, bias)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    steps = torch.stack([causal_conv1d_step(x[:, :, t], state, weight, bias) for t in range(9)], -1)
    assert torch.allclose(steps, full, atol=1e-12)
    assert torch.equal(state, x[:, :, -4:])


def packed_rows(lengths_per_row, total):
    """seq_idx (rows, total) for records of the given lengths laid one after another in each row; the
    rest of a row is padding, one more record."""
    seq_idx = torch.zeros(len(lengths_per_row), total, dtype=torch.int64)
    for row, lengths in enumerate(lengths_per_row):
        at = 0
        for i, n in enumerate(lengths):
            seq_idx[row, at : at + n] = i
            at += n
        seq_idx[row, at:] = len(lengths)
    return seq_idx


@pytest.mark.parametrize("lengths,chunk", [
    ([[7, 20, 13], [40]], 16),            # a record crossing chunk boundaries, one ending mid-chunk
    ([[16, 16, 8], [3, 3, 3, 3, 5]], 16),  # boundaries on a chunk edge, many records inside one chunk
    ([[1, 44], [29, 2, 2]], 8),           # one-token records
])
def test_packed_scan_equals_each_record_scanned_alone(lengths, chunk):
    """Several records in one row (seq_idx): each record's outputs equal its own scan from a zero state,
    and the final state is the last record's (its trailing padding is its own record)."""
    total = 45
    x, dt, A, B, C, D = random_inputs(2, total, 4, 8, 2, 8, seed=11)
    seq_idx = packed_rows(lengths, total)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx)
    for row, row_lengths in enumerate(lengths):
        at = 0
        for n in row_lengths + [total - sum(row_lengths)]:
            piece = slice(at, at + n)
            if n:
                y_ref, final_ref = ssd_naive(*(t[row : row + 1, piece] for t in (x, dt)), A,
                                             *(t[row : row + 1, piece] for t in (B, C)), D=D)
                assert torch.allclose(y[row : row + 1, piece], y_ref, atol=1e-10), (row, at, n)
                last_final = final_ref
            at += n
        assert torch.allclose(final[row : row + 1], last_final, atol=1e-10)
    # Without seq_idx the same rows run as one sequence each: the check above can fail.
    y_joined, _ = ssd_chunk_scan(x, dt, A, B, C, chunk, D=D)
    assert not torch.allclose(y_joined, y, atol=1e-3)


def test_packed_scan_keeps_an_initial_state_for_the_first_record_only():
    x, dt, A, B, C, D = random_inputs(1, 30, 4, 8, 2, 8, seed=4)
    start = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    seq_idx = packed_rows([[12, 18]], 30)
    y, _ = ssd_chunk_scan(x, dt, A, B, C, 8, D=D, initial_states=start, seq_idx=seq_idx)
    first, _ = ssd_naive(x[:, :12], dt[:, :12], A, B[:, :12], C[:, :12], D=D, initial_states=start)
    second, _ = ssd_naive(x[:, 12:], dt[:, 12:], A, B[:, 12:], C[:, 12:], D=D)
    assert torch.allclose(y, torch.cat([first, second], 1), atol=1e-10)


def test_packed_conv_equals_each_record_convolved_alone():
    g = torch.Generator().manual_seed(1)
    lengths = [[1, 5, 2, 3], [11]]
    x = torch.randn(2, 6, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    out = causal_conv1d(x, weight, bias, seq_idx=packed_rows(lengths, 12))
    for row, row_lengths in enumerate(lengths):
        at = 0
        for n in row_lengths + [12 - sum(row_lengths)]:
            if n:
                alone = causal_conv1d(x[row : row + 1, :, at : at + n], weight, bias)
                assert torch.allclose(out[row : row + 1, :, at : at + n], alone, atol=1e-12), (row, at)
            at += n
    assert not torch.allclose(causal_conv1d(x, weight, bias), out)


def test_mamba_ssm_triton_kernels_load_without_its_compiled_extension(tmp_path, monkeypatch):
    """mamba_ssm's package __init__ imports a CUDA extension its Mamba-2 Triton kernels never use: where
    that extension was not built, `kernels` still loads the kernels' modules (a stand-in package here)."""
    import importlib
    import sys

    from matvlm_cli import kernels

    triton_dir = tmp_path / "mamba_ssm" / "ops" / "triton"
    triton_dir.mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("import selective_scan_cuda_not_built\n")
    (tmp_path / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (triton_dir / "__init__.py").write_text("")
    (triton_dir / "helper.py").write_text("VALUE = 42\n")
    (triton_dir / "ssd_combined.py").write_text("from mamba_ssm.ops.triton.helper import VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = {name for name in sys.modules if name.startswith("mamba_ssm")}
    for name in before:
        monkeypatch.delitem(sys.modules, name)
    try:
        with pytest.raises(ImportError):
            importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        assert kernels._import_mamba_ssm_triton("mamba_ssm.ops.triton.ssd_combined").VALUE == 42
    finally:
        for name in [n for n in sys.modules if n.startswith("mamba_ssm")]:
            del sys.modules[name]


def test_the_hopper_autotune_shortlists_are_the_committed_probes_top_two(tmp_path):
    """kernels/autotune-sm90.json is what experiments/gpu/autotune_probe.py --shortlist makes of the
    full-autotune probes committed under docs/results/distill/autotune/: nothing hand-edited, nothing stale."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from matvlm_cli.kernels import shortlists

    root = Path(__file__).resolve().parents[1]
    probes = sorted((root / "docs/results/distill/autotune").glob("*-full.json"))
    assert len(probes) >= 3
    made = tmp_path / "shortlists.json"
    subprocess.run([sys.executable, str(root / "experiments/gpu/autotune_probe.py"), "--shortlist", *map(str, probes),
                    "--output", str(made)], check=True, capture_output=True)
    committed = json.loads(shortlists.SHORTLISTS.read_text())
    as_sets = lambda lists: {kernel: set(configs) for kernel, configs in lists.items()}  # noqa: E731
    assert as_sets(json.loads(made.read_text())["kernels"]) == as_sets(committed["kernels"])
    for kernel, configs in committed["kernels"].items():
        assert 1 <= len(configs) == len(set(configs)), kernel
        assert all("num_warps: " in c and "num_stages: " in c for c in configs), kernel
    # one packed training step at the 3.2B shape autotuned over 142 configs; the shortlists keep 55
    full = json.loads((root / "docs/results/distill/autotune/probe-h200-hd80-full.json").read_text())
    assert sum(len(t["ranked_ms"]) for t in full["autotuners"]) == 142
    assert sum(len(v) for v in committed["kernels"].values()) == 55


def test_the_shortlists_apply_only_on_hopper_and_not_with_full_autotuning(monkeypatch):
    from matvlm_cli.kernels import shortlists

    monkeypatch.setenv("MATVLM_AUTOTUNE", "full")
    assert not shortlists.wanted() and shortlists.shorten() == {}
    monkeypatch.delenv("MATVLM_AUTOTUNE")
    if not torch.cuda.is_available():
        assert not shortlists.wanted() and shortlists.shorten() == {}
    else:
        assert shortlists.wanted() == (torch.cuda.get_device_capability() == (9, 0))
