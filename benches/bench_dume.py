"""routed="model" forward cost against the dense model's, measured in the same run (issue 16).

CPU target: a routed="model" forward at T = 2048 tokens costs <= 1.25x one dense expert's
forward on the same tokens. Shape: a Llama with hidden 512, 4 layers, MLP 1536, 8 heads
(4 KV heads), vocabulary 8192, E = 4 experts, fp32, batch 4 x 512 tokens; the routers are
fitted in closed form (default options: the vocabulary router, half-life 16 tokens) on
four synthetic "domains" (a quarter of the vocabulary each) and the batch holds one sequence
per domain, so each sequence settles on its expert and the batch spreads over all four
(extra_info: the share of tokens per expert). The routed forward pays the router (a gather
and a running mean of E logits per token) and one grouped linear per projection (tokens grouped
by expert) over the dense one.

Smoke run (--benchmark-disable): 2 x 32 tokens, one repetition, and the forced-routing check.
"""

import time

import torch
import transformers

import fastdume
from fastdume.models.modeling import forced_expert

SHAPE = dict(
    vocab_size=8192, hidden_size=512, num_hidden_layers=4, intermediate_size=1536,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    tie_word_embeddings=False,
)  # fmt: skip
EXPERTS = 4


def seconds(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def experts(shape):
    out = []
    for seed in range(EXPERTS):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(**shape)
        out.append(transformers.LlamaForCausalLM(config).eval())
    return out


def domain_tokens(batch, seq, seed):
    """Row r is "domain" r % E: its tokens come from that domain's quarter of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    width = SHAPE["vocab_size"] // EXPERTS
    lows = (torch.arange(batch) % EXPERTS * width)[:, None]
    return lows + torch.randint(0, width, (batch, seq), generator=g)


def fit_on_domains(model, seq):
    """Closed-form routers from one batch per domain (what a user's model has)."""
    stats = None
    rows = domain_tokens(8 * EXPERTS, min(seq, 128), seed=0)
    for e, domain in enumerate(model.config.domains):
        stats = fastdume.collect_stats(model, domain, [rows[e::EXPERTS]], stats=stats,
                                       progress=False)  # fmt: skip
    fastdume.fit_router(model, stats)


def test_cpu_routed_model_vs_dense(benchmark):
    """Target: routed="model" forward <= 1.25x the dense forward at T = 2048 (fp32)."""
    batch, seq = (2, 32) if benchmark.disabled else (4, 512)
    repeat = 1 if benchmark.disabled else 3
    dense = experts(SHAPE)
    model = fastdume.upcycle(dense, routed="model", progress=False).eval()
    fit_on_domains(model, seq)
    ids = domain_tokens(batch, seq, seed=1)
    with torch.no_grad(), forced_expert(model, 1):  # the routed path is the dense expert
        assert torch.equal(
            model(ids, use_cache=False).logits, dense[1](ids, use_cache=False).logits
        )

    def routed():
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    def plain():
        with torch.no_grad():
            return dense[0](ids, use_cache=False).logits

    benchmark(routed)
    info = dict(tokens=batch * seq, target_ratio_vs_dense=1.25,
                expert_shares=_expert_shares(model, ids))  # fmt: skip
    # Interleaved, and at 1 thread too: on a shared 2-core machine multi-threaded GEMM times
    # swing with the other jobs' load, one thread much less.
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}):
        torch.set_num_threads(n)
        try:
            pairs = [(seconds(routed, 1), seconds(plain, 1)) for _ in range(repeat)]
        finally:
            torch.set_num_threads(threads)
        t_routed, t_dense = (sum(t) / repeat for t in zip(*pairs, strict=True))
        info.update({f"routed_ms_{n}t": t_routed * 1e3, f"dense_ms_{n}t": t_dense * 1e3,
                     f"ratio_vs_dense_{n}t": t_routed / t_dense})  # fmt: skip
    benchmark.extra_info.update(info)


def _expert_shares(model, ids):
    """Share of the tokens each expert runs (the decision the forward takes, recorded)."""
    seen = []
    model.dume_state.on_decision = lambda index, experts: seen.append(experts.reshape(-1))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.dume_state.on_decision = None
    counts = torch.bincount(seen[0], minlength=EXPERTS).double()
    return [round(float(c), 3) for c in counts / counts.sum()]
