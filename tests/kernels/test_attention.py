"""Paged attention kernels vs the torch references in gllm_engine.kernels.reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gllm_engine.kernels import attention, reference
from gllm_engine.layers.attention import prefill_tile_map

DTYPES = [torch.float32, torch.bfloat16]
HEADS = [(4, 4), (8, 2)]  # (query heads, KV heads): GQA ratios 1 and 4
HEAD_DIMS = [64, 128]
# (new query tokens, context length after this step): a fresh prompt, a one-token prefill, chunked
# prefill continuing a cached prompt, and a prefix-cache hit whose tail spans several KV tiles.
PREFILL_REQUESTS = [(7, 7), (1, 18), (21, 37), (40, 75)]
DECODE_SEQ_LENS = [1, 16, 45, 83]  # exactly one block, a partial block, several blocks


def _ids(value: object) -> str:
    return str(value).replace("torch.", "")


@pytest.fixture(params=["default", "small"])
def prefill_tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The shipped tile config, and 16x16 tiles that cut these short requests into many tiles."""
    if request.param == "small":
        monkeypatch.setattr(attention, "prefill_config", lambda *_: attention.PrefillTiles(16, 16, 4, 1))
    return request.param


def tile_map(q_lens: list[int], seq_lens: list[int], head_dim: int, dtype: torch.dtype, device: torch.device,
             first_request: int = 0, size: int | None = None) -> torch.Tensor:
    """The prefill kernel's tile map for these requests, with the kernel's tile size."""
    block_m = attention.prefill_block_m(head_dim, dtype)
    return torch.from_numpy(prefill_tile_map(np.array(q_lens), np.array(seq_lens), block_m, first_request,
                                             size)).to(device)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_prefill_matches_reference(dtype, heads, head_dim, prefill_tiles, device, make_paged_kv, assert_matches):
    num_heads, num_kv_heads = heads
    q_lens = [q for q, _ in PREFILL_REQUESTS]
    seq_lens = [s for _, s in PREFILL_REQUESTS]
    k_cache, v_cache, table = make_paged_kv(seq_lens, num_kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, table, qsl, lens, tile_map(q_lens, seq_lens, head_dim, dtype, device),
            head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    got = attention.paged_prefill_attention(*args, out=out)
    assert got is out
    assert_matches(out, reference.paged_prefill_attention(*args))


def test_prefill_writes_only_the_rows_of_its_tile_map(device, make_paged_kv, assert_matches):
    """Decode rows come first and the map is padded with -1 (a CUDA graph's fixed grid): those rows stay untouched."""
    q_lens, seq_lens = [1, 1, 9, 3], [5, 12, 9, 30]
    k_cache, v_cache, table = make_paged_kv(seq_lens, 2, 64, torch.float32)
    q = torch.randn(sum(q_lens), 4, 64, device=device)
    qsl = torch.tensor([0, 1, 2, 11, 14], dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    tiles = tile_map(q_lens[2:], seq_lens[2:], 64, torch.float32, device, first_request=2, size=9)
    assert (tiles[0, -3:] == -1).all()
    out = torch.zeros_like(q)
    attention.paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, tiles, 0.125, out=out)
    expected = reference.paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, tiles, 0.125,
                                                 out=torch.zeros_like(q))
    assert_matches(out, expected)
    assert bool((out[:2] == 0).all()) and not bool((out[2:] == 0).all())


def test_tile_map_lists_every_tile_once_longest_first():
    q_lens, seq_lens = np.array([5, 130, 1]), np.array([5, 200, 3])
    tiles = prefill_tile_map(q_lens, seq_lens, 64, first_request=2, size=8)
    listed = sorted(zip(tiles[0].tolist(), tiles[1].tolist()))
    assert listed == [(-1, -1)] * 3 + [(2, 0), (3, 0), (3, 1), (3, 2), (4, 0)]
    # Request 3's last tile sees all 200 context tokens; its first tile sees 70 + 64; request 2 sees 5.
    assert tiles[:, 0].tolist() == [3, 2] and tiles[:, 4].tolist() == [4, 0]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_decode_matches_reference(dtype, heads, head_dim, num_splits, device, make_paged_kv, assert_matches,
                                  monkeypatch):
    num_heads, num_kv_heads = heads
    monkeypatch.setattr(attention, "decode_num_splits", lambda *_: num_splits)
    k_cache, v_cache, table = make_paged_kv(DECODE_SEQ_LENS, num_kv_heads, head_dim, dtype, seed=2)
    q = torch.randn(len(DECODE_SEQ_LENS), num_heads, head_dim, generator=torch.Generator().manual_seed(3))
    q = q.to(dtype).to(device)
    lens = torch.tensor(DECODE_SEQ_LENS, dtype=torch.int32, device=device)
    out = attention.paged_decode_attention(q, k_cache, v_cache, table, lens, head_dim**-0.5)
    assert_matches(out, reference.paged_decode_attention(q, k_cache, v_cache, table, lens, head_dim**-0.5))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_rows_with_no_context_are_zeros(num_splits, device, make_paged_kv, monkeypatch):
    """Padded decode rows of a CUDA graph have seq_len 0: both paths give zeros, the other rows are unchanged."""
    monkeypatch.setattr(attention, "decode_num_splits", lambda *_: num_splits)
    k_cache, v_cache, table = make_paged_kv([40, 40], 2, 64, torch.float32, seed=8)
    q = torch.randn(2, 4, 64, device=device)
    lens = torch.tensor([40, 0], dtype=torch.int32, device=device)
    for impl in (attention, reference):
        out = impl.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125,
                                          out=torch.full_like(q, float("nan")))
        assert bool((out[1] == 0).all()), impl.__name__
        full = impl.paged_decode_attention(q[:1], k_cache, v_cache, table[:1], lens[:1], 0.125)
        torch.testing.assert_close(out[:1], full)


@pytest.mark.parametrize("head_dim", [80, 96, 256])  # padded to a power of two inside the kernels
def test_other_head_dims(head_dim, device, make_paged_kv, assert_matches, monkeypatch):
    monkeypatch.setattr(attention, "decode_num_splits", lambda *_: 2)
    q_lens, seq_lens = [3, 1], [35, 20]
    k_cache, v_cache, table = make_paged_kv(seq_lens, 2, head_dim, torch.float32, seed=6)
    q = torch.randn(sum(q_lens), 8, head_dim, generator=torch.Generator().manual_seed(7)).to(device)
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    tiles = tile_map(q_lens, seq_lens, head_dim, torch.float32, device)
    args = (q, k_cache, v_cache, table, qsl, lens, tiles, head_dim**-0.5)
    assert_matches(attention.paged_prefill_attention(*args), reference.paged_prefill_attention(*args))
    decode_args = (q[:2], k_cache, v_cache, table, lens, head_dim**-0.5)
    assert_matches(attention.paged_decode_attention(*decode_args), reference.paged_decode_attention(*decode_args))


@pytest.mark.parametrize("cache", ["float8_e4m3fn", "int8"])
@pytest.mark.parametrize("head_dim", [80, 96])
def test_8bit_caches_with_other_head_dims(head_dim, cache, device, make_paged_kv, assert_matches, monkeypatch):
    """bf16 queries over an 8-bit cache whose heads are not a power of two: on a GPU the tiles load as 32-bit
    words (`_load_cache_tile`), the padded columns masked by word."""
    monkeypatch.setattr(attention, "decode_num_splits", lambda *_: 2)
    q_lens, seq_lens = [3, 1], [35, 20]
    k_cache, v_cache, table = make_paged_kv(seq_lens, 2, head_dim, torch.float32, seed=6)
    k_cache, v_cache, scales = reference.kv_caches_as(k_cache, v_cache, getattr(torch, cache))
    q = torch.randn(sum(q_lens), 8, head_dim, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    q = q.to(device)
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    tiles = tile_map(q_lens, seq_lens, head_dim, torch.bfloat16, device)
    args = (q, k_cache, v_cache, table, qsl, lens, tiles, head_dim**-0.5)
    assert_matches(attention.paged_prefill_attention(*args, **scales),
                   reference.paged_prefill_attention(*args, **scales))
    decode_args = (q[:2], k_cache, v_cache, table, lens, head_dim**-0.5)
    assert_matches(attention.paged_decode_attention(*decode_args, **scales),
                   reference.paged_decode_attention(*decode_args, **scales))


def test_decode_split_heuristic():
    sms = attention.DEFAULT_NUM_SMS
    long_ctx = 16 * attention.DECODE_SPLIT_MIN_TOKENS
    assert attention.decode_num_splits(1, 8, long_ctx, sms) > 1  # few programs, long context
    assert attention.decode_num_splits(1, 8, long_ctx, sms) <= attention.DECODE_MAX_SPLITS
    full = -(-attention.DECODE_PROGRAMS_PER_SM * sms // 8)  # the smallest batch that fills the GPU
    assert attention.decode_num_splits(full, 8, long_ctx, sms) == 1
    assert attention.decode_num_splits(full - 1, 8, long_ctx, sms) == 2
    assert attention.decode_num_splits(1, 8, 128, sms) == 1  # too short to be worth a reduce
    assert attention.decode_num_splits(16, 8, long_ctx, sms) < attention.decode_num_splits(1, 8, long_ctx, sms)


def test_decode_default_path_splits_long_contexts(device, make_paged_kv, assert_matches, monkeypatch):
    """Batch 1 with a block table wide enough: the shipped heuristic picks split-K by itself."""
    chosen = []
    heuristic = attention.decode_num_splits
    monkeypatch.setattr(attention, "decode_num_splits", lambda *a: chosen.append(heuristic(*a)) or chosen[-1])
    seq_len = 2 * attention.DECODE_SPLIT_MIN_TOKENS - 5
    k_cache, v_cache, table = make_paged_kv([seq_len], 2, 64, torch.float32, seed=4)
    q = torch.randn(1, 4, 64, device=device)
    lens = torch.tensor([seq_len], dtype=torch.int32, device=device)
    out = attention.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125)
    assert chosen[0] > 1
    assert_matches(out, reference.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.125))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_attention_widens_an_fp8_cache_to_the_queries_dtype(dtype, num_splits, device, make_paged_kv, assert_matches,
                                                           monkeypatch):
    """An fp8 cache gives what the same values in q's dtype give: exactly where the products stay in q's
    dtype (widening is exact), to the dtype's tolerance where bf16 queries multiply in float16."""
    monkeypatch.setattr(attention, "decode_num_splits", lambda *_: num_splits)
    q_lens, seq_lens = [1, 1, 9, 21], [45, 16, 9, 37]  # two decodes, then two prefills
    k_cache, v_cache, table = make_paged_kv(seq_lens, 2, 64, torch.float32, seed=9)
    fp8 = [c.to(torch.float8_e4m3fn) for c in (k_cache, v_cache)]
    widened = [c.to(dtype) for c in fp8]
    exact = attention.product_dtype(dtype, torch.float8_e4m3fn) == dtype

    def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
        if exact:
            assert torch.equal(actual, expected)
        else:
            assert_matches(actual, expected)

    q = torch.randn(sum(q_lens), 8, 64, generator=torch.Generator().manual_seed(10)).to(dtype).to(device)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    tiles = tile_map(q_lens[2:], seq_lens[2:], 64, dtype, device, first_request=2)
    prefill = attention.paged_prefill_attention(q, *fp8, table, qsl, lens, tiles, 0.125, out=torch.zeros_like(q))
    assert_same(prefill, attention.paged_prefill_attention(q, *widened, table, qsl, lens, tiles, 0.125,
                                                           out=torch.zeros_like(q)))
    assert_matches(prefill, reference.paged_prefill_attention(q, *fp8, table, qsl, lens, tiles, 0.125,
                                                              out=torch.zeros_like(q)))
    decode = attention.paged_decode_attention(q[:2], *fp8, table[:2], lens[:2], 0.125)
    assert_same(decode, attention.paged_decode_attention(q[:2], *widened, table[:2], lens[:2], 0.125))
    assert_matches(decode, reference.paged_decode_attention(q[:2], *fp8, table[:2], lens[:2], 0.125))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_attention_over_an_int8_cache_matches_the_reference(dtype, num_splits, device, make_paged_kv, assert_matches,
                                                            monkeypatch):
    """Prefill and decode over an int8 cache with per-token-head scales give the reference's output, and
    that is close to attention over the values it stands for. Rows no request owns have NaN scales; one
    request's V is all zeros (zero scales)."""
    monkeypatch.setattr(attention, "decode_num_splits", lambda *_: num_splits)
    q_lens, seq_lens = [1, 1, 9, 21], [45, 16, 9, 37]  # two decodes, then two prefills
    k_cache, v_cache, table = make_paged_kv(seq_lens, 2, 64, torch.float32, seed=9)
    v_cache[table[1, 0]] = 0.0  # request 1's whole context: every V scale of its tiles is 0
    k8, v8, scales = reference.kv_caches_as(k_cache, v_cache, torch.int8)
    q = torch.randn(sum(q_lens), 8, 64, generator=torch.Generator().manual_seed(10)).to(dtype).to(device)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    tiles = tile_map(q_lens[2:], seq_lens[2:], 64, dtype, device, first_request=2)
    args = (table, qsl, lens, tiles, 0.125)
    prefill = attention.paged_prefill_attention(q, k8, v8, *args, out=torch.zeros_like(q), **scales)
    assert_matches(prefill, reference.paged_prefill_attention(q, k8, v8, *args, out=torch.zeros_like(q), **scales))
    decode = attention.paged_decode_attention(q[:2], k8, v8, table[:2], lens[:2], 0.125, **scales)
    assert_matches(decode, reference.paged_decode_attention(q[:2], k8, v8, table[:2], lens[:2], 0.125, **scales))
    exact = reference.paged_decode_attention(q[:2].float(), k_cache, v_cache, table[:2], lens[:2], 0.125)
    torch.testing.assert_close(decode.float(), exact, atol=3e-2, rtol=0)  # int8 keeps about 2 digits
