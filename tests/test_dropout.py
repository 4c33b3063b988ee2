"""BitsDropout: the drop rate, the scaling and reproducibility under torch.manual_seed."""

import pytest
import torch

from llmforge_finetune.dropout import BitsDropout, adapter_dropout_replaced


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_rate_and_mean(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(400_001, dtype=dtype)
    out = BitsDropout(p).train()(x)

    dropped = (out == 0).double().mean().item()
    # 400k Bernoulli draws: the standard error of the rate is below 0.001.
    assert abs(dropped - p) < 0.004
    kept = out[out != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-2)
    assert abs(out.double().mean().item() - 1) < 0.01
    assert out.dtype == dtype


def test_every_lane_is_uniform():
    # Each int64 draw feeds four consecutive elements; each of the four must drop at rate p.
    torch.manual_seed(1)
    out = BitsDropout(0.5).train()(torch.ones(400_000, 4))
    rates = (out == 0).double().mean(0)
    assert torch.all((rates - 0.5).abs() < 0.005), rates


def test_reproducible_and_identity_in_eval():
    x = torch.randn(3, 7, 5)
    dropout = BitsDropout(0.2).train()
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x))
    assert not torch.equal(first, dropout(x))
    assert dropout.eval()(x) is x


def test_gradient_is_the_mask():
    x = torch.randn(64, 16, requires_grad=True)
    torch.manual_seed(4)
    out = BitsDropout(0.25).train()(x)
    out.sum().backward()
    scale = 65536 / (65536 - 16384)
    assert torch.equal(x.grad, torch.where(out != 0, scale, 0.0))


def test_replaces_peft_lora_dropout(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    before = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())

    with adapter_dropout_replaced(model) as replaced:
        assert replaced == before > 0
        assert sum(isinstance(m, BitsDropout) for m in model.modules()) == replaced

    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == before
    assert not any(isinstance(m, BitsDropout) for m in model.modules())
