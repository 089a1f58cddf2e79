"""routed="model" and the router options (features, depth): forced routing is transformers' own
dense expert bit for bit, statistics equal a float64 reference built from the dense experts'
hidden states, add/remove equal from-scratch builds, save/load through the Auto classes, cached
generation equals full recomputation (also left-padded batches), bad input."""

import json
import math

import pytest
import torch
import transformers
from dume_fixtures import DOMAINS, domain_batches, make_experts
from tiny_models import tiny_dense, tiny_dume

import fastdume
from fastdume.models.modeling import forced_expert
from fastdume.models.routing import running_mean
from fastdume.router import RouterStats, collect_stats, fit_router

OPTIONS = [(f, d) for f in ("token", "context", "context:4") for d in
           ("layer", "cumulative", "single")]  # fmt: skip
OPTIONS += [("vocab", "single"), ("vocab:3", "single")]  # the vocabulary router: single only


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three llama experts whose every tensor differs (MLPs most)."""
    return make_experts(tmp_path_factory.mktemp("routed"), shared_noise=0.05)[1]


def build(dirs, domains, routed="model", features=None, depth=None, count=3, table=None,
          shared="mean"):  # fmt: skip
    """upcycle + statistics + fit; table: the routers' token table to use instead of the mean of
    these experts' embeddings (routed="model")."""
    model = fastdume.upcycle(
        [dirs[d] for d in domains], domains=list(domains), routed=routed, features=features,
        depth=depth, progress=False, shared=shared,
    )  # fmt: skip
    if table is not None:
        with torch.no_grad():
            model.router_embed.weight.copy_(table)
    stats = None
    for d in domains:
        stats = collect_stats(model, d, domain_batches(d, count), stats=stats, progress=False)
    return fit_router(model, stats), stats


# --- forced routing is the dense expert -----------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tie", [False, True])
def test_forced_expert_is_the_dense_expert_bit_for_bit(family, tie):
    dense = [tiny_dense(family, seed=s, tie_word_embeddings=tie) for s in range(3)]
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    for features, depth in [("context", "single"), ("token", "layer"), ("context:4", "cumulative")]:
        model = fastdume.upcycle(dense, routed="model", features=features, depth=depth)
        with torch.no_grad():
            for router in model.dume_routers():  # routers that would pick other experts
                router.weight.normal_()
            for e in range(3):
                with forced_expert(model, e):
                    got = model(input_ids=ids, attention_mask=mask).logits
                want = dense[e](input_ids=ids, attention_mask=mask).logits
                assert torch.equal(got, want), (features, depth, e)


def test_gradients_reach_the_routed_experts_tensors_as_the_dense_experts():
    dense = [tiny_dense("llama", seed=s) for s in range(3)]
    model = fastdume.upcycle(dense, routed="model", features="context", depth="layer")
    ids = torch.randint(0, 256, (2, 9))
    with forced_expert(model, 2):
        model(input_ids=ids, labels=ids).loss.backward()
    dense[2](input_ids=ids, labels=ids).loss.backward()
    grads = dict(dense[2].named_parameters())
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad[2], grads[name].grad, msg=name)
            assert not param.grad[:2].any(), name
    # mixed routing (every token to another expert than its neighbour) trains each expert on
    # its own tokens: the loss is differentiable through the grouped path too
    with torch.no_grad():
        model.dume_routers()[0].weight.normal_()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "model.layers" in n)


def test_routed_model_keeps_every_tensor_per_expert(experts):
    model = fastdume.upcycle(
        [experts[d] for d in DOMAINS], routed="model", features="context", progress=False
    )
    dense = transformers.AutoModelForCausalLM.from_pretrained(experts["b"]).state_dict()
    state = model.state_dict()
    for key, value in dense.items():
        assert torch.equal(state[key][1], value), key
    means = torch.stack([
        transformers.AutoModelForCausalLM.from_pretrained(experts[d]).model.embed_tokens.weight
        for d in DOMAINS
    ]).double().mean(0)  # fmt: skip
    torch.testing.assert_close(model.router_embed.weight.double(), means, rtol=1e-6, atol=1e-7)
    assert model.config.shared == "none" and model.config.top_k == 1
    # the default, the vocabulary router, has no token table: its one router reads token ids
    default = fastdume.upcycle([experts[d] for d in DOMAINS], routed="model", progress=False)
    assert (default.config.router_features, default.config.router_depth) == ("vocab:16", "single")
    assert not hasattr(default, "router_embed")
    assert default.dume_routers()[0].weight.shape == (len(DOMAINS), 256)


# --- features and statistics against float64 references ------------------------------------


def _loop_mean(u, mask, half_life):
    """Plain float64 loop: decay by 2^(-1/h) per real token, padding neither counted nor decayed."""
    decay = 0.5 ** (1 / half_life)
    out = torch.zeros(u.shape, dtype=torch.float64)
    for b in range(u.shape[0]):
        total, count = torch.zeros(u.shape[-1], dtype=torch.float64), 0.0
        for t in range(u.shape[1]):
            if mask[b, t]:
                total, count = decay * total + u[b, t].double(), decay * count + 1.0
            out[b, t] = total / count if count else 0.0
    return out


@pytest.mark.parametrize("half_life", [math.inf, 3.0, 1.0])
def test_running_mean_matches_a_float64_loop_and_resumes_from_its_state(half_life):
    u = torch.randn(3, 300, 5)  # longer than one 256-token chunk
    mask = torch.rand(3, 300) > 0.3
    mask[1, :40] = False
    full, _ = running_mean(u, mask, None, half_life)
    want = _plain_mean(u, mask) if math.isinf(half_life) else _loop_mean(u, mask, half_life)
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-6)
    first, state = running_mean(u[:, :170], mask[:, :170], None, half_life)
    second, _ = running_mean(u[:, 170:], mask[:, 170:], state, half_life)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-6, atol=1e-6)


def _plain_mean(u, mask):
    out = torch.zeros(u.shape, dtype=torch.float64)
    for b in range(u.shape[0]):
        seen = []
        for t in range(u.shape[1]):
            if mask[b, t]:
                seen.append(u[b, t].double())
            out[b, t] = torch.stack(seen).mean(0) if seen else 0.0
    return out


def _rms(x):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("features,depth", [("context", "single"), ("token", "layer"),
                                            ("context:4", "cumulative")])  # fmt: skip
def test_statistics_are_the_dense_experts_features(experts, features, depth):
    model = fastdume.upcycle(
        [experts[d] for d in DOMAINS], domains=list(DOMAINS), routed="model", features=features,
        depth=depth, progress=False,
    )  # fmt: skip
    batches = domain_batches("b")
    stats = collect_stats(model, "b", batches, progress=False)
    dense = transformers.AutoModelForCausalLM.from_pretrained(experts["b"]).eval()
    table = torch.stack([
        transformers.AutoModelForCausalLM.from_pretrained(experts[d]).model.embed_tokens.weight
        for d in DOMAINS
    ]).double().mean(0)  # fmt: skip
    layers = 1 if depth == "single" else 2
    assert stats.num_layers == layers
    assert stats.options == {"routed": "model", "features": features, "depth": depth}
    gram = torch.zeros(layers, 64, 64, dtype=torch.float64)
    colsum = torch.zeros(layers, 64, dtype=torch.float64)
    count = 0
    half_life = None if features == "token" else float(features.partition(":")[2] or "inf")
    for batch in batches:
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            hidden = dense(**batch, output_hidden_states=True).hidden_states
        inputs = [table[batch["input_ids"]], *hidden[1:layers]]
        for layer, x in enumerate(inputs):
            f = _rms(x)
            if half_life is not None:
                f = (
                    _plain_mean(f, mask)
                    if math.isinf(half_life)
                    else _loop_mean(f, mask, half_life)
                )
            rows = f[mask]
            gram[layer] += rows.T @ rows
            colsum[layer] += rows.sum(0)
        count += int(mask.sum())
    torch.testing.assert_close(stats.gram("b"), gram, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.colsum("b"), colsum, rtol=1e-4, atol=1e-4)
    assert stats.count("b").tolist() == [count] * layers


def test_fitted_router_picks_the_domains_expert(experts):
    model, _ = build(experts, DOMAINS, features="context", depth="single", count=20)
    router = model.dume_routers()[0]
    for e, d in enumerate(DOMAINS):
        batch = domain_batches(d, seed=5, pad=False)[0]
        table = model.router_embed.weight.detach()[batch["input_ids"]]
        f = _plain_mean(_rms(table), batch["attention_mask"].bool())
        picked = (f @ router.weight.double().T + router.bias.double()).argmax(-1)
        assert (picked[:, 2:] == e).double().mean() > 0.85, d
        seen = []
        model.dume_state.on_decision = lambda index, experts, seen=seen: seen.append(experts)
        with torch.no_grad():
            routed = model(**batch).logits
        model.dume_state.on_decision = None
        assert len(seen) == 1 and (seen[0] == picked).double().mean() > 0.99
        # a row routed to its domain's expert throughout is that dense expert
        with torch.no_grad(), forced_expert(model, e):
            forced = model(**batch).logits
        whole = (seen[0] == e).all(dim=1)
        assert whole.any(), d
        assert torch.equal(routed[whole], forced[whole])


# --- add / remove are exact -----------------------------------------------------------------


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-7, msg=key)
    assert a.config.domains == b.config.domains
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("features,depth", [("context", "single"), ("token", "cumulative")])
def test_add_and_remove_expert_equal_from_scratch_builds(experts, features, depth):
    """Exact because forcing expert e reproduces dense expert e whatever the other experts are;
    the routers' token table stays the one the model was built with (so the from-scratch
    reference uses it too)."""
    options = dict(features=features, depth=depth)
    two, stats = build(experts, ["a", "b"], **options)
    table = two.router_embed.weight.detach().clone()
    added, added_stats = fastdume.add_expert(two, experts["c"], "c", domain_batches("c"), stats)
    full, full_stats = build(experts, DOMAINS, **options, table=table)
    _assert_same(added, full)
    for d in DOMAINS:
        assert torch.equal(added_stats.gram(d), full_stats.gram(d)), d
    full, full_stats = build(experts, DOMAINS, **options)
    ac, _ = build(experts, ["a", "c"], **options, table=full.router_embed.weight.detach())
    removed, removed_stats = fastdume.remove_expert(full, "b", full_stats)
    _assert_same(removed, ac)
    assert removed_stats.domains == ["a", "c"]


@pytest.mark.parametrize("features,depth", [("context", "single"), ("context:8", "cumulative")])
def test_add_and_remove_expert_are_exact_for_mlp_experts_too(tmp_path, features, depth):
    """routed="mlp" with the other options, shared weights from the base: exact as the paper's."""
    base, dirs = make_experts(tmp_path, shared_noise=0.0)
    options = dict(routed="mlp", features=features, depth=depth, shared=f"base:{base}")
    full, full_stats = build(dirs, DOMAINS, **options)
    two, stats = build(dirs, ["a", "b"], **options)
    added, _ = fastdume.add_expert(two, dirs["c"], "c", domain_batches("c"), stats)
    _assert_same(added, full)
    removed, _ = fastdume.remove_expert(full, "b", full_stats)
    _assert_same(removed, build(dirs, ["a", "c"], **options)[0])


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_auto_from_pretrained(tmp_path, tie):
    dense = [tiny_dense("llama", seed=s, tie_word_embeddings=tie) for s in range(2)]
    model = fastdume.upcycle(dense, routed="model", features="context:16", depth="cumulative")
    with torch.no_grad():
        for router in model.dume_routers():
            router.weight.normal_()
            router.bias.normal_()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = loaded.config
    assert (config.routed, config.router_features, config.router_depth) == (
        "model", "context:16", "cumulative")  # fmt: skip
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_configs_saved_before_the_options_load_as_the_paper(tmp_path):
    model = tiny_dume("llama")
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("routed", "router_features", "router_depth"):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    c = loaded.config
    assert (c.routed, c.router_features, c.router_depth) == ("mlp", "token", "layer")
    assert loaded.dume_state is None  # the paper's forward, unchanged
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_statistics_record_their_options_and_refuse_others(experts, tmp_path):
    model, stats = build(experts, DOMAINS, features="context", depth="single")
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = RouterStats.load(path, model=model)
    assert loaded.options == {"routed": "model", "features": "context", "depth": "single"}
    other = fastdume.upcycle(
        [experts[d] for d in DOMAINS], domains=list(DOMAINS), routed="model", features="token",
        depth="single", progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="features='context'.*features='token'"):
        fit_router(other, loaded)
    with pytest.raises(ValueError, match="routing options"):
        RouterStats.load(path, model=other)
    other_stats = collect_stats(other, "a", domain_batches("a"), progress=False)
    with pytest.raises(ValueError, match="routing options"):
        loaded + other_stats
    paper, paper_stats = build(experts, DOMAINS, routed="mlp")
    with pytest.raises(ValueError, match="routed='mlp'.*routed='model'"):
        fit_router(model, paper_stats)
    # files written before the options existed are the paper's
    paper_stats.options = None
    paper_stats.save(tmp_path / "old.safetensors")
    old = RouterStats.load(tmp_path / "old.safetensors", model=paper)
    assert old.options == {"routed": "mlp", "features": "token", "depth": "layer"}


# --- generation -----------------------------------------------------------------------------


def _greedy_by_recomputation(model, ids, mask, steps):
    seq, mask = ids, mask
    logits = []
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=seq, attention_mask=mask, use_cache=False).logits[:, -1]
        logits.append(out)
        seq = torch.cat([seq, out.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return seq, torch.stack(logits, 1)


def _generate(model, ids, mask, steps):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
        eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def fitted(experts):
    cache = {}

    def get(routed, features, depth):
        key = (routed, features, depth)
        if key not in cache:
            cache[key] = build(experts, DOMAINS, routed, features, depth)[0]
        return cache[key]

    return get


# every combination but the paper's (routed="mlp", token, layer: tests/test_modeling.py)
@pytest.mark.parametrize(
    "routed,features,depth",
    [
        (r, f, d)
        for r in ("model", "mlp")
        for f, d in OPTIONS
        if (r, f, d) != ("mlp", "token", "layer")
    ],
)
def test_cached_generation_equals_recomputation_with_left_padding(fitted, routed, features, depth):
    model = fitted(routed, features, depth)
    long = torch.cat(
        [domain_batches(d, seed=7, pad=False)[0]["input_ids"][:1, :4] for d in ("b", "c")], 1
    )  # fmt: skip  (changes domain midway)
    short = domain_batches("a", seed=8, pad=False)[0]["input_ids"][:1, :5]
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    steps = 6
    seq, logits = _generate(model, ids, mask, steps)
    want_seq, want_logits = _greedy_by_recomputation(model, ids, mask, steps)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    # the padded row generates what it generates alone, unpadded
    alone, alone_logits = _generate(model, short, torch.ones_like(short), steps)
    assert torch.equal(seq[0, 3:], alone[0])
    torch.testing.assert_close(logits[0], alone_logits[0], rtol=1e-5, atol=1e-5)


def test_a_cache_without_the_running_mean_is_refused(fitted):
    model = fitted("model", "context", "single")
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        del cache.dume_context
        with pytest.raises(ValueError, match="running-mean state"):
            model(ids[:, :1], past_key_values=cache)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(routed="moe"), "routed must be one of"),
        (dict(routed="model", features="ctx"), "features must be"),
        (dict(routed="model", features="context:0.5"), "half-life >= 1"),
        (dict(routed="mlp", depth="deep"), "depth must be one of"),
        (dict(routed="model", shared="base:/tmp"), "shared must be left at its default"),
        (dict(routed="model", top_k=2), "top_k must be 1 for routed='model'"),
    ],
)
def test_bad_options_raise_naming_the_argument(experts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdume.upcycle([experts[d] for d in DOMAINS], progress=False, **kwargs)


def test_export_mixtral_refuses_a_routed_model_and_says_why(experts, tmp_path):
    from fastdume.models.mixtral import export_mixtral

    model = fastdume.upcycle([experts[d] for d in DOMAINS], routed="model", progress=False)
    with pytest.raises(ValueError, match="Mixtral shares attention"):
        export_mixtral(model, tmp_path / "out")
    ctx = fastdume.upcycle([experts[d] for d in DOMAINS], features="context", progress=False)
    with pytest.raises(ValueError, match="cannot express"):
        export_mixtral(ctx, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_experts_with_other_vocabularies_are_refused():
    small = [tiny_dense("llama", seed=0), tiny_dense("llama", seed=1, vocab_size=300)]
    with pytest.raises(ValueError, match="vocab_size"):
        fastdume.upcycle(small, routed="model")


def test_gradient_checkpointing_is_refused_for_the_stateful_options():
    model = fastdume.upcycle([tiny_dense("llama", seed=s) for s in range(2)], routed="model")
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(torch.randint(0, 256, (1, 5)))


def test_a_deep_copy_routes_on_its_own_state():
    """The evaluation copies models (copy.deepcopy): the copy's modules share the copy's state."""
    import copy

    dense = [tiny_dense("llama", seed=s) for s in range(2)]
    model = fastdume.upcycle(dense, routed="model", features="context", depth="layer")
    clone = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad(), forced_expert(clone, 1):
        torch.testing.assert_close(clone(ids).logits, dense[1](ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, dense[0](ids).logits, rtol=0, atol=0)
