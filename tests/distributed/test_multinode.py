"""Multi-node engines on one machine: nodes as processes over 127.0.0.1, over a veth pair between two
network namespaces, and `gllm serve` on each node; disagreeing nodes fail with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
import torch

from gllm_cli.serve import spawn_server
from gllm_engine import LLM, SamplingParams
from gllm_engine.config import EngineConfig
from gllm_engine.executor.comm import RankComm
from gllm_engine.executor.launcher import free_port
from gllm_engine.executor.worker import setup_fingerprint
from tests.helpers import make_tiny_model_dir

pytestmark = pytest.mark.distributed

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 1 for j in range(4 + 5 * i)]} for i in range(4)]


def greedy_tokens(path, **kw) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, show_progress=False, **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.shutdown()


def node_code(path, node_rank: int, **kwargs) -> str:
    """Python for one node: node 0 generates and prints its tokens as JSON, the others serve their ranks."""
    kwargs = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, nnodes=2, node_rank=node_rank, **kwargs)
    if node_rank > 0:
        return ("from gllm_engine.config import EngineConfig\n"
                "from gllm_engine.executor.executor import serve_node\n"
                f"serve_node(EngineConfig.create({str(path)!r}, **{kwargs!r}))\n")
    return ("import json\n"
            "from gllm_engine import LLM, SamplingParams\n"
            f"llm = LLM({str(path)!r}, show_progress=False, **{kwargs!r})\n"
            f"outs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))\n"
            "print('TOKENS', json.dumps([o.outputs[0].token_ids for o in outs]))\n"
            "llm.engine.shutdown()\n")


def start(code: str, *, netns: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def printed_tokens(output: str) -> list[list[int]]:
    line = next((ln for ln in output.splitlines() if ln.startswith("TOKENS ")), None)
    assert line is not None, output
    return json.loads(line.removeprefix("TOKENS "))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("LlamaForCausalLM", tmp_path_factory.mktemp("multinode"), with_tokenizer=False,
                               num_hidden_layers=4)


@pytest.fixture(scope="module")
def single(model_dir) -> list[list[int]]:
    return greedy_tokens(model_dir)


def test_two_nodes_over_loopback(model_dir, single):
    port = free_port()
    node1 = start(node_code(model_dir, 1, tensor_parallel_size=2, master_port=port))
    try:
        assert greedy_tokens(model_dir, tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port) == single
        assert node1.wait(timeout=60) == 0, node1.stdout.read()
    finally:
        node1.kill()


def test_nodes_that_disagree_fail_with_a_clear_error(model_dir):
    port = free_port()
    node1 = start(node_code(model_dir, 1, pipeline_parallel_size=2, master_port=port))  # node 0 says tp
    try:
        with pytest.raises(RuntimeError, match="every node needs the same options"):
            greedy_tokens(model_dir, tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port)
        node1.wait(timeout=60)
        assert "every node needs the same options" in node1.stdout.read()
    finally:
        node1.kill()


def test_a_node_with_no_one_at_the_master_address_says_so(model_dir):
    config = EngineConfig.create(str(model_dir), device="cpu", tensor_parallel_size=2, nnodes=2, node_rank=1,
                                 master_port=free_port())
    expected = r"could not join the rendezvous at 127\.0\.0\.1.*--master-addr/--master-port"
    with pytest.raises(RuntimeError, match=expected):
        RankComm(1, config.parallel, 4, torch.device("cpu"), ("127.0.0.1", config.parallel.master_port),
                 setup_fingerprint(config), rendezvous_timeout_s=2)


@pytest.fixture
def veth_pair() -> Iterator[tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """Two network namespaces joined by a veth pair: ((netns, interface, address) for each end)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    tag = uuid.uuid4().hex[:6]
    ends = ((f"gllm-a-{tag}", f"gva{tag}", "10.213.0.1"), (f"gllm-b-{tag}", f"gvb{tag}", "10.213.0.2"))

    def ip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    made = []
    try:
        for ns, _, _ in ends:
            if ip("netns", "add", ns).returncode != 0:
                pytest.skip("this machine does not allow network namespaces (needs root)")
            made.append(ns)
        (ns_a, if_a, _), (ns_b, if_b, _) = ends
        steps = [("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)]
        for ns, iface, addr in ends:
            steps += [("-n", ns, "addr", "add", f"{addr}/24", "dev", iface), ("-n", ns, "link", "set", iface, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            result = ip(*step)
            if result.returncode != 0:
                pytest.skip(f"could not build the veth pair: ip {' '.join(step)}: {result.stderr.strip()}")
        yield ends
    finally:
        for ns in made:
            ip("netns", "del", ns)


def test_two_nodes_in_network_namespaces_joined_by_veth(model_dir, single, veth_pair):
    (ns0, if0, addr0), (ns1, if1, _) = veth_pair
    layout = dict(tensor_parallel_size=2, master_addr=addr0, master_port=29517)
    node1 = start(node_code(model_dir, 1, **layout), netns=ns1, env={"GLOO_SOCKET_IFNAME": if1})
    node0 = start(node_code(model_dir, 0, **layout), netns=ns0, env={"GLOO_SOCKET_IFNAME": if0})
    try:
        out0, _ = node0.communicate(timeout=180)
        assert node0.returncode == 0, out0
        assert printed_tokens(out0) == single
        assert node1.wait(timeout=60) == 0, node1.stdout.read()
    finally:
        node0.kill()
        node1.kill()


def test_gllm_serve_on_two_nodes(tmp_path):
    path = make_tiny_model_dir("LlamaForCausalLM", tmp_path, num_hidden_layers=4)
    prompt = [5, 17, 33, 2048, 9]
    llm = LLM(str(path), device="cpu", dtype="float32", show_progress=False)
    expected = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0].outputs[0]
    port = str(free_port())
    multi = ("--tp", "2", "--nnodes", "2", "--master-port", port, "--dtype", "float32")
    node1 = subprocess.Popen([sys.executable, "-m", "gllm_cli.main", "serve", str(path), "--device", "cpu",
                              "--node-rank", "1", *multi], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server, url = spawn_server(str(path), "--node-rank", "0", *multi)
        try:
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
            assert answer["choices"][0]["text"] == expected.text
            assert answer["usage"]["completion_tokens"] == len(expected.token_ids)
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
        assert node1.wait(timeout=60) == 0, node1.stdout.read()
    finally:
        node1.kill()
