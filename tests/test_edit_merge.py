"""forge edit merge: exact results of each merge method on hand-made tensors, option parsing, and the plugin hook."""

from __future__ import annotations

import pytest
import torch

from llmforge.errors import ForgeError
from llmforge.hookspecs import hookimpl
from llmforge_edit import merge
from llmforge_edit.merge import (
    available_merge_methods,
    dare_prune,
    magnitude_mask,
    parse_layers,
    parse_modules,
    parse_vector_spec,
    tensor_seed,
    tensor_selected,
)


def run_method(name, deltas, weights, densities=None, *, seed=0, normalize=None):
    method = merge.BUILTIN_MERGE_METHODS[name]
    tensors = [torch.tensor(delta, dtype=torch.float32) for delta in deltas]
    generator = torch.Generator().manual_seed(seed)
    return method(tensors, weights=weights, densities=densities or [1.0] * len(deltas), generator=generator,
                  normalize=normalize)


# Exact results


def test_task_arithmetic_weighted_sum():
    merged = run_method("task_arithmetic", [[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]], [1.0, 2.0])
    assert merged.tolist() == [2.0, -1.0, 1.0]


def test_task_arithmetic_normalized_by_weight_sum():
    merged = run_method("task_arithmetic", [[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]], [1.0, 2.0], normalize=True)
    torch.testing.assert_close(merged, torch.tensor([2.0, -1.0, 1.0]) / 3)


def test_magnitude_mask_keeps_largest_entries():
    mask = magnitude_mask(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5)
    assert mask.tolist() == [False, True, True, False]


def test_magnitude_mask_floors_the_kept_count():
    # int(0.3 * 4) = 1 entry kept, as mergekit counts it.
    mask = magnitude_mask(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.3)
    assert mask.tolist() == [False, True, False, False]


def test_magnitude_prune_prunes_then_sums():
    merged = run_method("magnitude_prune", [[0.1, -3.0, 2.0, -0.5], [1.0, 0.2, 0.3, -4.0]], [1.0, 0.5], [0.5, 0.25])
    # Vector 1 keeps -3 and 2, vector 2 keeps only -4 (weighted -2).
    assert merged.tolist() == [0.0, -3.0, 2.0, -2.0]


def test_ties_sign_election_normalized():
    merged = run_method("ties", [[1.0, -2.0, 3.0, 1.0], [-3.0, 1.0, 1.0, -1.0]], [1.0, 1.0])
    # The sums -2, -1, 4 and 0 elect the signs -, -, + and + (a zero sum elects +). Entries of the
    # other sign are dropped, and each remaining sum is divided by the weights that agree.
    assert merged.tolist() == [-3.0, -2.0, 2.0, 1.0]


def test_ties_without_normalization_sums_agreeing_entries():
    merged = run_method("ties", [[1.0, -2.0, 3.0, 1.0], [-3.0, 1.0, 1.0, -1.0]], [1.0, 1.0], normalize=False)
    assert merged.tolist() == [-3.0, -2.0, 4.0, 1.0]


def test_ties_elects_on_weighted_values():
    # Weights 3 and 1: the weighted sums are 3 - 2 = 1 and -3 + 4 = 1, so + wins both entries.
    merged = run_method("ties", [[1.0, -1.0], [-2.0, 4.0]], [3.0, 1.0], normalize=False)
    assert merged.tolist() == [3.0, 4.0]


def test_ties_prunes_before_the_election():
    merged = run_method("ties", [[0.1, -3.0, 2.0, -0.5], [-2.0, 1.5, 1.0, -1.0]], [2.0, 1.0], [0.5, 0.5])
    # Pruning leaves [0, -3, 2, 0] and [-2, 1.5, 0, 0], weighted [0, -6, 4, 0] and [-2, 1.5, 0, 0].
    # The elected signs are -, -, + and +. The agreeing sums -2, -6 and 4 are divided by the
    # agreeing weights 1, 2 and 2, and the last entry has no agreeing value.
    assert merged.tolist() == [-2.0, -3.0, 2.0, 0.0]


def test_dare_prune_rescales_kept_entries_with_fixed_seed():
    delta = torch.arange(1.0, 9.0)
    pruned = dare_prune(delta, 0.5, torch.Generator().manual_seed(7))
    keep = torch.rand(8, generator=torch.Generator().manual_seed(7)) < 0.5

    assert pruned.tolist() == torch.where(keep, delta * 2, torch.zeros(8)).tolist()
    assert 0 < int(keep.sum()) < 8


def test_dare_prune_keeps_density_and_mean():
    delta = torch.ones(200_000)
    pruned = dare_prune(delta, 0.3, torch.Generator().manual_seed(0))
    kept_fraction = float((pruned != 0).float().mean())

    assert abs(kept_fraction - 0.3) < 0.01
    assert abs(float(pruned.mean()) - 1.0) < 0.03
    assert pruned.unique().tolist() == [0.0, pytest.approx(1.0 / 0.3)]


def test_dare_linear_exact_with_fixed_seed():
    deltas = [[1.0, 2.0, 3.0, 4.0], [-1.0, 1.0, -1.0, 1.0]]
    merged = run_method("dare_linear", deltas, [1.0, 0.5], [0.5, 0.25], seed=3)
    generator = torch.Generator().manual_seed(3)
    keep_first = torch.rand(4, generator=generator) < 0.5
    keep_second = torch.rand(4, generator=generator) < 0.25
    expected = (torch.where(keep_first, torch.tensor(deltas[0]) / 0.5, torch.zeros(4))
                + 0.5 * torch.where(keep_second, torch.tensor(deltas[1]) / 0.25, torch.zeros(4)))
    assert merged.tolist() == expected.tolist()


def test_dare_ties_exact_with_fixed_seed():
    deltas = [[1.0, -2.0, 3.0, -4.0, 5.0, -6.0], [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]]
    merged = run_method("dare_ties", deltas, [1.0, 1.0], [0.5, 0.5], seed=11)
    generator = torch.Generator().manual_seed(11)
    first = torch.where(torch.rand(6, generator=generator) < 0.5, torch.tensor(deltas[0]) * 2, torch.zeros(6))
    second = torch.where(torch.rand(6, generator=generator) < 0.5, torch.tensor(deltas[1]) * 2, torch.zeros(6))
    elected = torch.where(first + second >= 0, 1.0, -1.0)
    expected = first * (first.sign() == elected) + second * (second.sign() == elected)
    assert merged.tolist() == expected.tolist()


def test_density_one_disables_pruning():
    deltas = [[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]]
    plain = run_method("task_arithmetic", deltas, [1.0, 2.0])
    assert run_method("dare_linear", deltas, [1.0, 2.0]).tolist() == plain.tolist()
    assert run_method("magnitude_prune", deltas, [1.0, 2.0]).tolist() == plain.tolist()


def test_tensor_seed_depends_on_seed_and_name():
    assert tensor_seed(0, "a.weight") == tensor_seed(0, "a.weight")
    assert tensor_seed(0, "a.weight") != tensor_seed(1, "a.weight")
    assert tensor_seed(0, "a.weight") != tensor_seed(0, "b.weight")


# Option parsing


def test_vector_spec_with_options(tmp_path):
    spec = parse_vector_spec(f"{tmp_path}/tv.safetensors:weight=0.7,density=0.5")
    assert spec.path == tmp_path / "tv.safetensors"
    assert (spec.weight, spec.density) == (0.7, 0.5)


def test_vector_spec_defaults_and_colon_in_path():
    spec = parse_vector_spec("runs/a:b/tv.safetensors")
    assert str(spec.path) == "runs/a:b/tv.safetensors"
    assert (spec.weight, spec.density) == (1.0, 1.0)


@pytest.mark.parametrize("text, message", [
    ("tv.safetensors:density=0", "outside (0, 1]"),
    ("tv.safetensors:density=1.5", "density 1.5"),
    ("tv.safetensors:weight=abc", "invalid weight 'abc'"),
    ("tv.safetensors:scale=2", "invalid --vector option 'scale=2'"),
    ("tv.safetensors:weight=nan", "finite"),
])
def test_vector_spec_rejects(text, message):
    with pytest.raises(ForgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_vector_spec(text)


def test_parse_layers_ranges():
    assert parse_layers("0-2,5", 6) == {0, 1, 2, 5}


@pytest.mark.parametrize("text, message", [("0-6", "out of range"), ("3-1", "start is after the end"),
                                           ("x", "invalid --layers item 'x'")])
def test_parse_layers_rejects(text, message):
    with pytest.raises(ForgeError, match=message):
        parse_layers(text, 6)


def test_parse_modules_rejects_empty():
    with pytest.raises(ForgeError, match="invalid --modules"):
        parse_modules(" , ")


def test_tensor_selected_by_layer_and_module():
    name = "model.layers.3.self_attn.q_proj.weight"
    assert tensor_selected(name, {3}, {"q_proj"})
    assert tensor_selected(name, None, {"self_attn"})
    assert not tensor_selected(name, {2}, None)
    assert not tensor_selected(name, None, {"v_proj"})
    assert not tensor_selected("model.embed_tokens.weight", {0}, None)


# The forge_merge_methods hook


class ThirdPartyPlugin:
    """A plugin object that adds one method and tries to replace a built-in one."""

    @staticmethod
    def double(deltas, *, weights, densities, generator, normalize=None):
        return 2 * sum(weight * delta for weight, delta in zip(weights, deltas))

    @hookimpl
    def forge_merge_methods(self):
        return {"double_sum": self.double, "ties": self.double}


@pytest.fixture
def plugin_manager():
    from llmforge.plugins import get_plugin_manager, reset_for_tests

    reset_for_tests()
    yield get_plugin_manager()
    reset_for_tests()


def test_hook_provides_builtin_methods(plugin_manager):
    methods = available_merge_methods()
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        assert methods[name] is merge.BUILTIN_MERGE_METHODS[name]


def test_hook_adds_plugin_method_but_keeps_builtins(plugin_manager):
    plugin_manager.register(ThirdPartyPlugin(), name="third-party-merge")
    methods = available_merge_methods()

    assert methods["double_sum"] is ThirdPartyPlugin.double
    assert methods["ties"] is merge.ties
