"""The DUME model: parity with transformers' own Mixtral block and dense models, save/load through
the Auto classes, generation with the KV cache, fp32 routers, oracle routing."""

import copy

import pytest
import torch
import transformers
from tiny_models import FAMILIES, tiny_config, tiny_dense, tiny_dume
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import fastdume  # noqa: F401  (registers DUME with the Auto classes)
from fastdume.moe import DumeConfig, DumeForCausalLM, DumeMoE, forced_expert, fused_moe


def _mixtral_block(top_k, num_experts=4, hidden=32, inter=48):
    config = transformers.MixtralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return config, block


@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_moe_matches_transformers_mixtral_block(top_k):
    config, block = _mixtral_block(top_k)
    x = torch.randn(3, 11, config.hidden_size)
    with torch.no_grad():
        expected = block(x)
        experts = block.experts
        got = fused_moe(
            x.reshape(-1, config.hidden_size),
            block.gate.weight,
            None,
            experts.gate_up_proj,
            experts.down_proj,
            top_k=top_k,
        )
    torch.testing.assert_close(got.view_as(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dume_moe_module_matches_mixtral_block(top_k):
    config, block = _mixtral_block(top_k)
    dume_config = DumeConfig(
        base_config=tiny_config("llama", hidden_size=32, intermediate_size=48).to_dict(),
        num_experts=config.num_local_experts,
        top_k=top_k,
    )
    moe = DumeMoE(dume_config, dume_config.dense_config())
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        moe.router.bias.zero_()
        moe.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        moe.experts.down_proj.copy_(block.experts.down_proj)
        x = torch.randn(2, 9, 32)
        torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-5)


def test_forced_expert_is_that_experts_dense_mlp():
    model = tiny_dume("llama")
    dense_mlp = transformers.models.llama.modeling_llama.LlamaMLP(model.model.config)
    moe = model.dume_layers()[0]
    inter = model.model.config.intermediate_size
    with torch.no_grad():
        gate_up = moe.experts.gate_up_proj[2]
        dense_mlp.gate_proj.weight.copy_(gate_up[:inter])
        dense_mlp.up_proj.weight.copy_(gate_up[inter:])
        dense_mlp.down_proj.weight.copy_(moe.experts.down_proj[2])
        x = torch.randn(2, 5, 64)
        with forced_expert(model, "c"):
            assert [m.force_expert for m in model.dume_layers()] == [2, 2]
            got = moe(x)
        assert [m.force_expert for m in model.dume_layers()] == [None, None]
        torch.testing.assert_close(got, dense_mlp(x), rtol=1e-5, atol=1e-5)
        # learned routing differs from oracle routing on these random routers
        assert not torch.allclose(moe(x), got)


def test_forced_expert_rejects_unknown_expert():
    model = tiny_dume("llama")
    for bad in ("zzz", 3, -1, True):
        with pytest.raises(ValueError, match="expert must be"):
            with forced_expert(model, bad):
                pass
    assert all(m.force_expert is None for m in model.dume_layers())


@pytest.mark.parametrize("family", FAMILIES)
def test_one_expert_model_equals_the_dense_model(family):
    """E=1 DUME with the dense MLP as expert 0 is the dense model: every non-MLP path is the
    family's own."""
    dense = tiny_dense(family, seed=1, tie_word_embeddings=(family == "qwen2"))
    config = DumeConfig(base_config=dense.config.to_dict(), domains=["only"])
    model = DumeForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing)
    with torch.no_grad():
        for moe, layer in zip(model.dume_layers(), dense.model.layers, strict=True):
            mlp = layer.mlp
            moe.experts.gate_up_proj[0] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            moe.experts.down_proj[0] = mlp.down_proj.weight
        ids = torch.randint(0, 256, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        expected = dense(ids, attention_mask=mask, labels=ids)
        got = model(ids, attention_mask=mask, labels=ids)
        as_tuple = model(ids, attention_mask=mask, return_dict=False)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(as_tuple[0], expected.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_and_auto_from_pretrained(family, tmp_path):
    model = tiny_dume(family, top_k=2, temperature=0.7, tie_word_embeddings=(family == "qwen2"))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DumeConfig)
    assert (config.dense_family, config.domains, config.top_k) == (family, ["a", "b", "c"], 2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DumeForCausalLM
    assert loaded.dume_layers()[1].temperature == pytest.approx(0.7)
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied == (family == "qwen2")
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generate_with_cache_equals_manual_argmax_loop(family):
    model = tiny_dume(family, top_k=2)
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        seq = ids
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_routing_top_k_is_not_a_sampling_default():
    model = tiny_dume("llama", top_k=3)
    assert model.generation_config.top_k in (None, 50)


def test_router_stays_fp32_in_low_precision(tmp_path):
    model = tiny_dume("mistral", top_k=2)
    model.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        for m in (loaded, tiny_dume("mistral", top_k=2).to(dtype)):
            moe = m.dume_layers()[0]
            assert moe.router.weight.dtype == moe.router.bias.dtype == torch.float32
            assert moe.experts.gate_up_proj.dtype == dtype
        torch.testing.assert_close(
            loaded.dume_layers()[0].router.weight, model.dume_layers()[0].router.weight
        )
        ids = torch.randint(0, 256, (2, 7))
        with torch.no_grad():
            low = loaded(ids).logits.float()
            high = model(ids).logits
        assert (low - high).abs().max() < 0.05 * high.abs().max()


def test_half_keeps_router_values_exact():
    model = tiny_dume("llama")
    before = model.dume_layers()[0].router.weight.clone()
    model.half()
    assert torch.equal(model.dume_layers()[0].router.weight, before)


def test_dume_config_rejects_bad_values():
    base = tiny_config("llama").to_dict()
    with pytest.raises(ValueError, match="domains"):
        DumeConfig(base_config=base, domains=["a", "a"])
    with pytest.raises(ValueError, match="top_k"):
        DumeConfig(base_config=base, domains=["a", "b"], top_k=3)
    with pytest.raises(ValueError, match="router_temperature"):
        DumeConfig(base_config=base, domains=["a"], router_temperature=0.0)
    gpt2 = transformers.GPT2Config().to_dict()
    with pytest.raises(ValueError, match="gpt2"):
        DumeConfig(base_config=gpt2, domains=["a"])
    with pytest.raises(ValueError, match="mlp_bias"):
        DumeConfig(base_config=tiny_config("llama", mlp_bias=True).to_dict(), domains=["a"])


@pytest.mark.gpu
def test_cuda_low_precision_model_matches_cpu_fp32():
    model = tiny_dume("llama", top_k=2)
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
        assert gpu.dume_layers()[0].router.weight.dtype == torch.float32
        got = gpu(ids.cuda()).logits.float().cpu()
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()
        # the KV-cache check in fp32: bf16 rounding may flip near-tied argmaxes
        fp32 = copy.deepcopy(model).to("cuda")
        generated = fp32.generate(
            ids[:1].cuda(), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        seq = ids[:1].cuda()
        for _ in range(5):
            nxt = fp32(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)
