"""MoE models under parallel layouts on the CPU (gloo): expert, tensor and pipeline parallelism give the
single process's greedy tokens and log-probabilities; bad expert-parallel options fail in the config.

The tiny models are sharpened (tests/models/test_moe.py): a layout sums in another order, so each
reference run first checks that no routing choice and no greedy token is within MIN_MARGIN of a tie.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from gllm_cli.options import with_engine_options
from gllm_engine import LLM, SamplingParams
from gllm_engine.config import ConfigError, EngineConfig
from gllm_engine.models.qwen_moe import SparseMoeBlock
from tests.helpers import make_tiny_model_dir
from tests.models.test_moe import load_ours, make_moe_dir, step_inputs

PROMPTS = [[(13 * i + 7 * j) % 290 + 5 for j in range(3 + 4 * i)] for i in range(4)]  # 3 to 15 tokens
# logprobs=2: the greedy token's log-probability and the runner-up's (their gap is the logit margin).
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
MIN_MARGIN = 1e-3  # logit units; layouts differ by ~1e-6 in float32
LOGPROB_TOL = 1e-4
# (architecture, layers) -> layouts to compare: ep alone and the tp/pp layouts issue 8 dropped.
LAYOUTS = {
    ("Qwen3MoeForCausalLM", 4): [dict(tensor_parallel_size=2, expert_parallel_size=2),
                                 dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
    ("Qwen2MoeForCausalLM", 2): [dict(tensor_parallel_size=2, expert_parallel_size=2),
                                 dict(tensor_parallel_size=2)],
    ("MixtralForCausalLM", 2): [dict(tensor_parallel_size=2, expert_parallel_size=2)],
}
CASES = [(arch, layers, layout) for (arch, layers), layouts in LAYOUTS.items() for layout in layouts]
SHORT = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp", "expert_parallel_size": "ep"}
CASE_IDS = [f"{arch}-" + "-".join(f"{SHORT[k]}{v}" for k, v in layout.items()) for arch, _, layout in CASES]

Outputs = list[tuple[list[int], list[float]]]  # per prompt: greedy tokens, their log-probabilities


def engine(path: Path, **kw) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False, **kw)


def run(llm: LLM) -> tuple[Outputs, float]:
    """Greedy tokens and their log-probabilities per prompt, and the smallest top-1 minus top-2 gap."""
    outputs, margin = [], float("inf")
    for out in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY):
        completion = out.outputs[0]
        logprobs = []
        for token, step in zip(completion.token_ids, completion.logprobs):
            ranked = sorted((lp.logprob for lp in step.values()), reverse=True)
            margin = min(margin, ranked[0] - ranked[1])
            logprobs.append(step[token].logprob)
        outputs.append((list(completion.token_ids), logprobs))
    return outputs, margin


def router_margin(arch: str, path: Path, seqs: list[list[int]]) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over every token of `seqs` and every sparse layer."""
    model = load_ours(arch, path, num_seqs=len(seqs))
    top_k, gaps = model.spec.top_k, []

    def record(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        ranked = logits.sort(dim=-1, descending=True).values
        gaps.append((ranked[:, top_k - 1] - ranked[:, top_k]).min().item())

    for layer in model.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.gate.register_forward_hook(record)
    with torch.no_grad():
        model(*step_inputs(seqs, [(s, 0, len(seq)) for s, seq in enumerate(seqs)]))
    return min(gaps)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[Path, Outputs]]:
    """Per architecture: a sharpened model and its single-process outputs, checked to be far from ties."""
    cache: dict[str, tuple[Path, Outputs]] = {}

    def get(arch: str, layers: int) -> tuple[Path, Outputs]:
        if arch not in cache:
            path = make_moe_dir(arch, tmp_path_factory.mktemp(arch), sharpen=True, num_hidden_layers=layers)
            outputs, margin = run(engine(path))
            seqs = [prompt + tokens for prompt, (tokens, _) in zip(PROMPTS, outputs)]
            routing = router_margin(arch, path, seqs)
            assert min(margin, routing) > MIN_MARGIN, (
                f"{arch}: the reference run is within {min(margin, routing):.1e} of a tie (greedy {margin:.1e}, "
                f"routing {routing:.1e}); sharpen more or pick another seed")
            cache[arch] = path, outputs
        return cache[arch]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("arch,layers,layout", CASES, ids=CASE_IDS)
def test_layout_matches_the_single_process(references, arch, layers, layout):
    path, expected = references(arch, layers)
    llm = engine(path, **layout)
    try:
        got, _ = run(llm)
        assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected], layout
        for (_, lp_got), (_, lp_expected) in zip(got, expected):
            torch.testing.assert_close(torch.tensor(lp_got), torch.tensor(lp_expected), atol=LOGPROB_TOL,
                                       rtol=LOGPROB_TOL)
        experts = next(layer.mlp.experts for layer in llm.engine.executor.worker.runner.model.model.layers
                       if isinstance(getattr(layer, "mlp", None), SparseMoeBlock))
        assert len(experts.local_experts) == experts.num_experts // layout.get("expert_parallel_size", 1)
        kv = llm.engine.kv_cache
        assert kv.num_free_blocks == kv.pool.num_blocks
    finally:
        llm.engine.shutdown()


# ---- configuration ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    return make_moe_dir("Qwen3MoeForCausalLM", tmp_path_factory.mktemp("qwen3-moe"))


def config(path: Path, **kw) -> EngineConfig:
    return EngineConfig.create(str(path), device="cpu", skip_tokenizer_init=True, **kw)


def test_config_keeps_a_valid_expert_parallel_size(qwen3_moe):
    assert config(qwen3_moe).parallel.expert_parallel_size == 1
    parallel = config(qwen3_moe, tensor_parallel_size=4, expert_parallel_size=2).parallel
    assert (parallel.expert_parallel_size, parallel.world_size) == (2, 4)  # ep adds no ranks


@pytest.mark.parametrize("kw,message", [
    (dict(expert_parallel_size=0), "expert_parallel_size must be an integer >= 1"),
    (dict(expert_parallel_size=2), r"expert_parallel_size \(2\) must divide tensor_parallel_size \(1\)"),
    (dict(tensor_parallel_size=4, expert_parallel_size=3), r"must divide tensor_parallel_size \(4\)"),
], ids=["zero", "no-tp", "not-a-divisor"])
def test_expert_parallel_size_must_split_the_tensor_parallel_ranks(qwen3_moe, kw, message):
    with pytest.raises(ConfigError, match=message):
        config(qwen3_moe, **kw)


def test_the_experts_must_divide_over_the_expert_parallel_ranks(tmp_path):
    six = make_moe_dir("Qwen3MoeForCausalLM", tmp_path / "six", num_experts=6, moe_intermediate_size=47)
    with pytest.raises(ConfigError, match=r"expert_parallel_size \(4\) must divide the model's 6 experts"):
        config(six, tensor_parallel_size=4, expert_parallel_size=4)
    with pytest.raises(ConfigError, match=r"intermediate size \(47\) must divide over the 2 tensor-parallel ranks"):
        config(six, tensor_parallel_size=4, expert_parallel_size=2)


def test_a_dense_model_has_no_experts_to_spread(tmp_path):
    dense = make_tiny_model_dir("Qwen3ForCausalLM", tmp_path, with_tokenizer=False)
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model; Qwen3ForCausalLM has no routed experts"):
        config(dense, tensor_parallel_size=2, expert_parallel_size=2)


def test_cli_ep_flag_reaches_the_config_keyword():
    seen: dict = {}

    @with_engine_options
    def command(*, engine_kwargs: dict) -> None:
        seen.update(engine_kwargs)

    cli = typer.Typer()
    cli.command()(command)
    cli.command("other")(lambda: None)
    for flag in ("--ep", "--expert-parallel-size"):
        result = CliRunner().invoke(cli, ["command", "--tp", "4", flag, "2"])
        assert result.exit_code == 0, result.output
        assert (seen["tensor_parallel_size"], seen["expert_parallel_size"]) == (4, 2)

