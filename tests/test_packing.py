"""Packed batches give the same loss and gradients as padded ones, on Llama and Gemma 3 layouts."""

import pytest
import torch

from llmforge.data import IGNORE_INDEX, TokenizedExample, collate, make_batches, pack

from llmforge_finetune.packing import packed_attention_enabled, packed_forward, packing_supported


def random_examples(count: int, vocab: int, seed: int = 0) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(3, 14, (1,), generator=generator))
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def padded_loss(model, batch):
    """Reference: the padded batch through the model's own attention and its logits."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def packed_loss(model, batch):
    with packed_attention_enabled(model):
        hidden = packed_forward(model.get_decoder(), batch)
    logits = model.get_output_embeddings()(hidden[:, :-1])
    labels = batch.labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    # A sliding window of 4 tokens on the first layer, shorter than most examples, checks that
    # packed attention applies the window inside each example.
    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_packed_loss_and_gradients_equal_padded(build):
    model = build()
    examples = random_examples(6, model.config.vocab_size)
    assert packing_supported(model)

    reference = padded_loss(model, collate(examples, pad_token_id=0))
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    packed = pack(examples)
    loss = packed_loss(model, packed)
    loss.backward()

    assert packed.input_ids.shape == (1, sum(len(e.input_ids) for e in examples))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.config._attn_implementation != "forge_packed"


def test_pack_layout():
    examples = [TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8, 9], [8, 9])]
    packed = pack(examples)

    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # The second example's first token is not predicted from the first example's last one.
    assert packed.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert packed.segment_index.tolist() == [[0, 1, 2], [3, 4, 3]]
    assert packed.segment_valid.tolist() == [[True, True, True], [True, True, False]]
    assert packed.tokens == 5


def test_packed_epoch_has_the_padded_epoch_examples():
    examples = random_examples(21, 50, seed=3)
    padded = make_batches(examples, 4, pad_token_id=0, seed=7)
    packed = make_batches(examples, 4, pad_token_id=0, seed=7, packed=True)

    assert len(padded) == len(packed)
    for one, other in zip(padded, packed):
        assert one.tokens == other.tokens
        assert one.input_ids[one.attention_mask.bool()].tolist() == other.input_ids[0].tolist()


def test_training_loop_packed_equals_padded(tiny_model_dir):
    from llmforge.models import load_model

    from llmforge_finetune.adapters import wrap_model
    from llmforge_finetune.methods import MethodSettings, get_method
    from llmforge_finetune.train import TrainSettings, train

    curves, tokens = {}, {}
    for packing in (False, True):
        loaded = load_model(str(tiny_model_dir))
        examples = random_examples(12, loaded.model.config.vocab_size, seed=5)
        spec = get_method("lora")
        torch.manual_seed(0)
        model = wrap_model(loaded.model, spec, spec.resolve(MethodSettings(method="lora", dropout=0.0)), total_steps=4)
        settings = TrainSettings(steps=4, batch_size=4, lr=1e-2, warmup_steps=0, precision="fp32", packing=packing)
        result = train(model, examples, settings, pad_token_id=0, progress=False)
        curves[packing], tokens[packing] = result.loss_curve, result.tokens
        assert model.get_base_model().config._attn_implementation != "forge_packed"

    assert tokens[True] == tokens[False]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
    assert curves[True][-1] < curves[True][0]
