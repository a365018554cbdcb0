"""The Triton fused MoE (gllm_engine.kernels.moe) vs the torch reference `reference.fused_moe`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gllm_engine.kernels import moe, reference
from gllm_engine.layers.moe import FusedMoE, select_experts
from gllm_engine.layers.ops import REFERENCE_OPS

DTYPES = [torch.float32, torch.bfloat16]
# (tokens, experts, top-k, hidden, intermediate): one decode token, a small batch, a batch where one
# expert's run spans several row blocks, and sizes that are not multiples of any tile.
SHAPES = [(1, 8, 2, 64, 32), (6, 4, 2, 64, 32), (37, 8, 3, 64, 64), (9, 6, 1, 80, 48)]
SMALL_TILES = moe.MoeTiles(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)


def _ids(value: object) -> str:
    return str(value).replace("torch.", "")


def make_case(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
              device: torch.device, skew: bool = False, seed: int = 0):
    """x, w13, w2, routing weights and ids; `skew` sends most tokens to expert 0 and leaves some experts idle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if skew:
        logits[:, 0] += 4.0
        logits[:, num_experts // 2:] -= 8.0
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return (x.to(dtype).to(device), w13.to(dtype).to(device), w2.to(dtype).to(device), weights.to(device),
            ids.to(device))


ALIGNS = {"kernel": moe.align_by_expert_kernel, "sorted": moe.align_by_expert_sorted}


@pytest.mark.parametrize("align", list(ALIGNS))
@pytest.mark.parametrize("top_k,block_m", [(1, 16), (2, 16), (3, 32)])
def test_align_by_expert_groups_every_pair_once_in_single_expert_blocks(top_k, block_m, align, device):
    num_tokens, num_experts = 53, 7  # 159 pairs at top-3: more than one chunk of the kernel
    ids = torch.randint(0, num_experts - 2, (num_tokens, top_k), generator=torch.Generator().manual_seed(top_k))
    ids[:5] = num_experts - 2  # expert E-2 gets a few pairs, expert E-1 none
    sorted_ids, expert_ids, num_padded = (t.cpu() for t in ALIGNS[align](ids.to(device), num_experts, block_m))
    num_pairs = num_tokens * top_k
    flat = ids.reshape(-1)
    used = int(num_padded)
    assert sorted_ids.numel() == moe.padded_size(num_pairs, num_experts, block_m) >= used
    assert used % block_m == 0 and (sorted_ids[used:] == num_pairs).all()
    assert sorted(sorted_ids[sorted_ids < num_pairs].tolist()) == list(range(num_pairs))
    expected_start = 0
    for e in range(num_experts):
        pairs = (flat == e).nonzero().flatten().tolist()  # ascending: the order is stable
        blocks = -(-len(pairs) // block_m)
        run = sorted_ids[expected_start:expected_start + blocks * block_m]
        assert run[:len(pairs)].tolist() == pairs and (run[len(pairs):] == num_pairs).all(), f"expert {e}"
        assert (expert_ids[expected_start // block_m:expected_start // block_m + blocks] == e).all()
        expected_start += blocks * block_m
    assert expected_start == used
    assert (expert_ids[used // block_m:] == num_experts).all()


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(1, 8, 128), (300, 3, 60), (128, 8, 128)])
def test_align_kernel_equals_the_torch_sort(num_tokens, top_k, num_experts, device):
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=torch.Generator().manual_seed(7)).to(device)
    for a, b in zip(moe.align_by_expert_kernel(ids, num_experts, 16), moe.align_by_expert_sorted(ids, num_experts, 16)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_fused_moe_matches_reference(dtype, shape, tiles, device, assert_matches):
    x, w13, w2, weights, ids = make_case(*shape, dtype, device, skew=shape[0] > 30)
    out = moe.fused_moe(x, w13, w2, weights, ids, tiles=SMALL_TILES if tiles == "small" else None)
    expected = reference.fused_moe(x, w13, w2, weights, ids)
    assert expected.abs().max() > 0.1
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_fused_moe_with_the_torch_sort_of_large_steps(dtype, device, monkeypatch, assert_matches):
    monkeypatch.setattr(moe, "ALIGN_KERNEL_MAX_PAIRS", 0)
    x, w13, w2, weights, ids = make_case(37, 8, 3, 64, 64, dtype, device, skew=True)
    assert_matches(moe.fused_moe(x, w13, w2, weights, ids), reference.fused_moe(x, w13, w2, weights, ids))


@pytest.mark.parametrize("align", list(ALIGNS))
def test_align_by_expert_leaves_remote_pairs_out(align, device):
    """Id E marks a pair whose expert another expert-parallel rank holds: it gets no slot, as if absent."""
    num_tokens, top_k, num_experts, block_m = 45, 3, 5, 16  # 135 pairs: more than one chunk of the kernel
    ids = torch.randint(0, num_experts + 1, (num_tokens, top_k), generator=torch.Generator().manual_seed(4))
    sorted_ids, expert_ids, num_padded = (t.cpu() for t in ALIGNS[align](ids.to(device), num_experts, block_m))
    flat, num_pairs = ids.reshape(-1), ids.numel()
    assert (flat == num_experts).sum() > 10
    runs, blocks = [], []
    for e in range(num_experts):
        pairs = (flat == e).nonzero().flatten().tolist()
        padded = -(-len(pairs) // block_m) * block_m
        runs += pairs + [num_pairs] * (padded - len(pairs))
        blocks += [e] * (padded // block_m)
    assert int(num_padded) == len(runs) and sorted_ids.numel() == moe.padded_size(num_pairs, num_experts, block_m)
    assert sorted_ids[:len(runs)].tolist() == runs and (sorted_ids[len(runs):] == num_pairs).all()
    assert expert_ids[:len(blocks)].tolist() == blocks and (expert_ids[len(blocks):] == num_experts).all()


@pytest.mark.parametrize("sort", ["kernel", "torch"])
@pytest.mark.parametrize("skew", [False, True], ids=["even", "skewed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_expert_parallel_shares_match_the_reference_and_sum_to_the_whole(dtype, skew, sort, device, monkeypatch,
                                                                         assert_matches):
    """Two ranks of four experts each, other experts' pairs marked remote; skewed: rank 1 gets (almost) none."""
    if sort == "torch":
        monkeypatch.setattr(moe, "ALIGN_KERNEL_MAX_PAIRS", 0)
    x, w13, w2, weights, ids = make_case(37, 8, 3, 64, 64, dtype, device, skew=skew)
    shares = []
    for first in (0, 4):
        local = ids - first
        local = local.masked_fill((local < 0) | (local >= 4), 4)
        args = (x, w13[first:first + 4], w2[first:first + 4], weights, local)
        shares.append(moe.fused_moe(*args, remote_pairs=True))
        assert_matches(shares[-1], reference.fused_moe(*args, remote_pairs=True))
    assert_matches(shares[0] + shares[1], reference.fused_moe(x, w13, w2, weights, ids))


def test_the_reference_refuses_remote_pairs_it_was_not_told_of():
    x, w13, w2, weights, ids = make_case(5, 4, 2, 64, 32, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="remote_pairs=True"):
        reference.fused_moe(x, w13[:2], w2[:2], weights, ids.clamp(max=2))


def test_fused_moe_of_no_tokens_is_empty(device):
    x, w13, w2, weights, ids = make_case(0, 4, 2, 64, 32, torch.float32, device)
    assert moe.fused_moe(x, w13, w2, weights, ids).shape == (0, 64)


def test_fused_moe_layer_picks_the_triton_kernel_by_ops_name(device, assert_matches):
    """FusedMoE with the "triton" kernel set routes and combines as with the reference set."""
    x, w13, w2, _, _ = make_case(11, 8, 2, 64, 32, torch.float32, device)
    router_logits = torch.randn(11, 8, generator=torch.Generator().manual_seed(5)).to(device)
    outputs = []
    for ops in (REFERENCE_OPS, dataclasses.replace(REFERENCE_OPS, name="triton")):
        layer = FusedMoE(8, 2, 64, 32, renormalize=False, ops=ops).to(device)
        layer.w13.data.copy_(w13)
        layer.w2.data.copy_(w2)
        outputs.append(layer(x, router_logits))
    assert FusedMoE(8, 2, 64, 32, renormalize=False,
                    ops=dataclasses.replace(REFERENCE_OPS, name="triton")).fused_moe is moe.fused_moe
    assert_matches(outputs[1], outputs[0])


def test_moe_config_reads_the_table_by_tokens_and_falls_back_to_the_default(monkeypatch):
    w13 = torch.empty(4, 64, 32, dtype=torch.bfloat16)
    few, many = moe.MoeTiles(16, 32, 32, 1, 4, 1), moe.MoeTiles(32, 64, 32, 4, 4, 2)
    monkeypatch.setitem(moe.TUNED_TILES, ("cpu", 4, 32, 32, torch.bfloat16), ((8, few), (1 << 30, many)))
    assert moe.moe_config(8, 2, w13, torch.bfloat16) == few
    assert moe.moe_config(9, 2, w13, torch.bfloat16) == many
    assert moe.moe_config(9, 2, w13, torch.float32) == moe.default_tiles(9, 2, 4, torch.float32)
