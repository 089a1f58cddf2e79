"""transformers' own MoE models on fastdume's experts implementation, against their eager output."""

import pytest
import torch
import transformers

import fastdume.moe
from fastdume.models import hf_experts

SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=40, shared_expert_intermediate_size=24),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=40, head_dim=8),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4)),
}


def tiny_moe(family, top_k=2):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**SMALL, **extra, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init of the 3-D expert tensors may be left empty-ish
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):
                module.gate_up_proj.normal_(0, 0.2)
                module.down_proj.normal_(0, 0.2)
    return model


def logits_and_grads(model, ids):
    model.zero_grad()
    out = model(ids).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


# Every family on the torch path; two of them also through the Triton interpreter (slow on CPU;
# the other two share the same experts class shape and code path).
CASES = [(f, "torch") for f in sorted(FAMILIES)] + [("mixtral", "triton"), ("qwen3_moe", "triton")]


@pytest.mark.parametrize(("family", "backend"), CASES)
def test_accelerated_model_matches_eager(family, backend):
    model = tiny_moe(family)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    model.set_experts_implementation("eager")
    want, want_grads = logits_and_grads(model, ids)
    assert fastdume.moe.accelerate(model, backend=backend) is model
    assert model.config._experts_implementation == "fastdume"
    calls = []
    real = hf_experts.moe_experts
    hf_experts.moe_experts = lambda *a, **k: calls.append(k["backend"]) or real(*a, **k)
    try:
        got, got_grads = logits_and_grads(model, ids)
    finally:
        hf_experts.moe_experts = real
    assert calls and set(calls) == {backend}  # every layer went through fastdume
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_from_pretrained_by_name(tmp_path):
    model = tiny_moe("mixtral")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation="fastdume"
    )
    assert loaded.config._experts_implementation == "fastdume"
    ids = torch.randint(0, SMALL["vocab_size"], (1, 5))
    model.set_experts_implementation("eager")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_unsupported_experts_fall_back_and_bad_models_raise():
    model = tiny_moe("olmoe")
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    experts.act_fn = torch.nn.GELU()
    assert not hf_experts.supported(experts)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 6))
    model.set_experts_implementation("eager")
    want = model(ids).logits
    fastdume.moe.accelerate(model)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="model"):
        fastdume.moe.accelerate(torch.nn.Linear(2, 2))
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="no experts"):
        fastdume.moe.accelerate(dense)
    with pytest.raises(ValueError, match="backend"):
        fastdume.moe.accelerate(tiny_moe("mixtral"), backend="cuda")


def test_custom_op_passes_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration."""
    torch.manual_seed(1)
    x = torch.randn(6, 17)
    w = torch.rand(6, 2, requires_grad=True)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]] * 2)
    gate_up = (torch.randn(3, 2 * 9, 17) / 4).requires_grad_()
    down = (torch.randn(3, 17, 9) / 3).requires_grad_()
    torch.library.opcheck(
        torch.ops.fastdume.moe_experts.default,
        (x.requires_grad_(), w, ids, gate_up, down),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
