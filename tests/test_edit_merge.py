"""forge edit merge: exact results of each merge method on hand-made tensors, option parsing, and the plugin hook."""

from __future__ import annotations

import pytest
import torch

from llmforge.errors import ForgeError
from llmforge.hookspecs import hookimpl
from llmforge_edit import merge, merge_methods
from llmforge_edit.merge_methods import available_merge_methods, dare_prune, magnitude_mask
from llmforge_edit.merge import (
    parse_layers,
    parse_modules,
    parse_vector_spec,
    tensor_seed,
    tensor_selected,
)


def run_method(name, deltas, weights, densities=None, *, seed=0, normalize=None):
    method = merge_methods.BUILTIN_MERGE_METHODS[name]
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
    ("tv.safetensors:weight=1,weight=2", "sets weight twice"),
])
def test_vector_spec_rejects(text, message):
    with pytest.raises(ForgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_vector_spec(text)


def test_parse_layers_ranges():
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]


@pytest.mark.parametrize("text, message", [("0-6", "out of range"), ("3-1", "start is after the end"),
                                           ("x", "invalid --layers 'x'")])
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
        assert methods[name] is merge_methods.BUILTIN_MERGE_METHODS[name]


def test_hook_adds_plugin_method_but_keeps_builtins(plugin_manager):
    plugin_manager.register(ThirdPartyPlugin(), name="third-party-merge")
    methods = available_merge_methods()

    assert methods["double_sum"] is ThirdPartyPlugin.double
    assert methods["ties"] is merge_methods.ties


# Streaming reads and writes


TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_with_writer(path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    from llmforge_edit.tensor_files import SafetensorsWriter, tensor_buffer

    entries = [(name, TORCH_TO_SAFETENSORS[tensor.dtype], tuple(tensor.shape)) for name, tensor in tensors.items()]
    with open(path, "wb") as handle:
        writer = SafetensorsWriter(handle, entries, metadata or {"format": "pt"})
        for tensor in tensors.values():
            writer.write(tensor_buffer(tensor))
        writer.finish()


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(5, 3, generator=generator),
        "b.bf16": torch.randn(4, 2, 3, generator=generator).bfloat16(),
        "c.f16": torch.randn(7, generator=generator).half(),
        "d.i64": torch.arange(6).view(2, 3),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }


def test_writer_output_loads_in_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = sample_tensors()
    write_with_writer(tmp_path / "t.safetensors", tensors, {"format": "pt", "note": "x"})
    loaded = load_file(tmp_path / "t.safetensors")

    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}


def test_read_rows_match_slices(tmp_path):
    from llmforge_edit.tensor_files import SafetensorsFile, as_torch

    tensors = sample_tensors()
    write_with_writer(tmp_path / "t.safetensors", tensors)
    with SafetensorsFile(tmp_path / "t.safetensors") as file:
        for name, tensor in tensors.items():
            whole = as_torch(file.read(name), file.dtype(name))
            assert torch.equal(whole, tensor), name
        rows = as_torch(file.read("b.bf16", 1, 3), "BF16")
        assert torch.equal(rows, tensors["b.bf16"][1:3])
        assert torch.equal(torch.from_numpy(file.read("a.f32", 4, 5)), tensors["a.f32"][4:5])


def test_writer_rejects_short_tensor(tmp_path):
    from llmforge_edit.tensor_files import SafetensorsWriter, tensor_buffer

    with open(tmp_path / "t.safetensors", "wb") as handle:
        writer = SafetensorsWriter(handle, [("w", "F32", (2, 2))], {})
        writer.write(tensor_buffer(torch.ones(3)))
        with pytest.raises(ForgeError, match="got 12 of its 16 bytes"):
            writer.finish()


def test_writer_rejects_extra_bytes(tmp_path):
    from llmforge_edit.tensor_files import SafetensorsWriter, tensor_buffer

    with open(tmp_path / "t.safetensors", "wb") as handle:
        writer = SafetensorsWriter(handle, [("w", "F32", (2,))], {})
        with pytest.raises(ForgeError, match="got 12 bytes but the header declares 8"):
            writer.write(tensor_buffer(torch.ones(3)))


def test_copy_from_reproduces_tensors(tmp_path):
    from safetensors.torch import load_file

    from llmforge_edit.tensor_files import SafetensorsFile, SafetensorsWriter

    tensors = sample_tensors()
    write_with_writer(tmp_path / "a.safetensors", tensors)
    with SafetensorsFile(tmp_path / "a.safetensors") as source, open(tmp_path / "b.safetensors", "wb") as handle:
        names = sorted(source.names(), reverse=True)
        writer = SafetensorsWriter(handle, [(name, source.dtype(name), source.shape(name)) for name in names], {})
        for name in names:
            writer.copy_from(source, name)
        writer.finish()
    copied = load_file(tmp_path / "b.safetensors")

    for name, tensor in tensors.items():
        assert torch.equal(copied[name], tensor), name


def test_as_float32_converts_each_dtype():
    from llmforge_edit.tensor_files import as_float32

    values = torch.tensor([1.5, -2.25, 3.0e-3, 65504.0])
    bfloat16_bits = values.bfloat16().view(torch.int16).numpy().view("uint16")
    cases = [("BF16", bfloat16_bits, torch.bfloat16), ("F16", values.half().numpy(), torch.float16),
             ("F64", values.double().numpy(), torch.float64)]
    for stored, array, dtype in cases:
        converted = as_float32(array, stored)
        assert converted.dtype.name == "float32", stored
        assert torch.equal(torch.from_numpy(converted), values.to(dtype).float()), stored


def test_row_blocks_cover_tensor():
    from llmforge_edit.tensor_files import row_blocks

    assert list(row_blocks((10, 3), 7)) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert list(row_blocks((3, 100), 7)) == [(0, 1), (1, 2), (2, 3)]
    assert list(row_blocks((4,), 100)) == [(0, 4)]
    assert list(row_blocks((), 100)) == [(0, 1)]


# Merging block by block


def save_vector(path, tensors: dict[str, torch.Tensor], **extra) -> None:
    from llmforge.checkpoint import save_task_vector

    save_task_vector(path, tensors, base_digest="sha256:base", tuned_digest="sha256:tuned",
                     extra={key: str(value) for key, value in extra.items()})


@pytest.fixture
def two_vectors(tmp_path):
    generator = torch.Generator().manual_seed(1)
    first = {"w": torch.randn(10, 3, generator=generator), "v": torch.randn(6, generator=generator)}
    second = {"w": torch.randn(10, 3, generator=generator)}
    save_vector(tmp_path / "first.safetensors", first)
    save_vector(tmp_path / "second.safetensors", second)
    return [tmp_path / "first.safetensors", tmp_path / "second.safetensors"], first, second


def make_plan(paths, method, stack, *, block_elements=None, scale=1.0, weights=None):
    from llmforge_edit.vectors import TaskVectorFile

    vectors = [stack.enter_context(TaskVectorFile(path)) for path in paths]
    return merge.MergePlan(vectors, weights or [1.0] * len(paths), [1.0] * len(paths), method, scale=scale, seed=0,
                           normalize=None, block_elements=block_elements)


def recording_method(shapes: list, *, elementwise: bool):
    def method(deltas, *, weights, densities, generator, normalize=None):
        shapes.append([tuple(delta.shape) for delta in deltas])
        return merge_methods.task_arithmetic(deltas, weights=weights, densities=densities, generator=generator)

    method.elementwise = elementwise
    return method


def test_elementwise_method_gets_bounded_blocks(two_vectors):
    import contextlib

    paths, first, second = two_vectors
    shapes = []
    with contextlib.ExitStack() as stack:
        plan = make_plan(paths, recording_method(shapes, elementwise=True), stack, block_elements=7)
        blocks = list(plan.update_blocks("w", (10, 3)))

    assert shapes == [[(2, 3), (2, 3)]] * 5
    assert [(start, stop) for start, stop, _ in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert torch.equal(torch.cat([update for _, _, update in blocks]), first["w"] + second["w"])


def test_other_methods_get_whole_tensors(two_vectors):
    import contextlib

    paths, _, _ = two_vectors
    shapes = []
    with contextlib.ExitStack() as stack:
        plan = make_plan(paths, recording_method(shapes, elementwise=False), stack, block_elements=7)
        list(plan.update_blocks("w", (10, 3)))

    assert shapes == [[(10, 3), (10, 3)]]


def test_missing_vector_entry_is_zero_per_block(two_vectors):
    import contextlib

    paths, first, _ = two_vectors
    with contextlib.ExitStack() as stack:
        plan = make_plan(paths, merge_methods.task_arithmetic, stack, block_elements=2, scale=0.5, weights=[2.0, 1.0])
        blocks = list(plan.update_blocks("v", (6,)))

    assert len(blocks) == 3
    assert torch.equal(torch.cat([update for _, _, update in blocks]), 0.5 * (2.0 * first["v"]))


def test_nonfinite_update_rejected(tmp_path):
    import contextlib

    save_vector(tmp_path / "bad.safetensors", {"w": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])})
    with contextlib.ExitStack() as stack:
        plan = make_plan([tmp_path / "bad.safetensors"], merge_methods.task_arithmetic, stack)
        with pytest.raises(ForgeError, match="NaN or infinite"):
            list(plan.update_blocks("w", (2, 2)))


def test_method_shape_mismatch_rejected(two_vectors):
    import contextlib

    def truncating(deltas, *, weights, densities, generator, normalize=None):
        return deltas[0][:1]

    paths, _, _ = two_vectors
    with contextlib.ExitStack() as stack:
        plan = make_plan(paths, truncating, stack)
        with pytest.raises(ForgeError, match=r"tensor 'w' \(rows 0 to 9\), whose shape is \(10, 3\)"):
            list(plan.update_blocks("w", (10, 3)))


def test_blockwise_write_matches_whole_tensor_write(two_vectors, tmp_path):
    import contextlib

    from safetensors.torch import load_file

    paths, first, second = two_vectors
    base = {"w": torch.randn(10, 3).bfloat16(), "v": torch.randn(6), "ids": torch.arange(4), "u": torch.randn(2, 2)}
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    write_with_writer(base_dir / "model.safetensors", base)
    outputs = {}
    for block_elements in (4, None):
        directory = tmp_path / f"out-{block_elements}"
        directory.mkdir()
        with contextlib.ExitStack() as stack:
            plan = make_plan(paths, merge_methods.task_arithmetic, stack, block_elements=block_elements, scale=0.5)
            merge.write_merged_weights(base_dir, directory, {"w", "v"}, plan)
        outputs[block_elements] = directory / "model.safetensors"

    assert outputs[4].read_bytes() == outputs[None].read_bytes()
    merged = load_file(outputs[4])
    expected_w = (base["w"].float() + 0.5 * (first["w"] + second["w"])).bfloat16()
    assert merged["w"].dtype == torch.bfloat16
    assert torch.equal(merged["w"], expected_w)
    assert torch.equal(merged["v"], base["v"] + 0.5 * first["v"])
    assert torch.equal(merged["ids"], base["ids"])
    assert torch.equal(merged["u"], base["u"])


def test_low_rank_rows_match_full_product(tmp_path):
    from llmforge_edit.vectors import TaskVectorFile

    generator = torch.Generator().manual_seed(2)
    factors = {"w.svd_u": torch.randn(8, 2, generator=generator), "w.svd_s": torch.tensor([3.0, 0.5]),
               "w.svd_vh": torch.randn(2, 5, generator=generator), "b": torch.randn(8, generator=generator)}
    save_vector(tmp_path / "low.safetensors", factors, layout="low-rank", rank=2)
    with TaskVectorFile(tmp_path / "low.safetensors") as vector:
        whole = vector.tensor("w")
        assert vector.names() == ["b", "w"]
        assert torch.equal(vector.rows("w", 3, 6), ((factors["w.svd_u"] * factors["w.svd_s"]) @ factors["w.svd_vh"])[3:6])
        torch.testing.assert_close(vector.rows("w", 3, 6), whole[3:6])
        assert torch.equal(vector.rows("b", 2, 4), factors["b"][2:4])


# The real model


# ru_maxrss of a process includes the peak of the process that started it (Linux keeps the old
# memory's peak across exec), and pytest has loaded torch and models. A fresh small Python process
# therefore starts the measured command and prints the command's peak in KiB.
PEAK_RSS_WRAPPER = (
    "import os, subprocess, sys\n"
    "process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(process.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def perturbed_copy(base_dir, output, names, seed):
    from safetensors.torch import load_file, save_file

    output.mkdir()
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            (output / path.name).write_bytes(path.read_bytes())
    tensors = load_file(base_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        tensors[name] = tensors[name] + 0.01 * torch.randn(tensors[name].shape, generator=generator)
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_merge_on_smollm2_is_exact_within_memory_bound(real_model_cache, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    from conftest import FORGE
    from llmforge.models import resolve_model_dir

    base_dir = resolve_model_dir("smollm2-135m")
    embedding = "model.embed_tokens.weight"
    perturbed_copy(base_dir, tmp_path / "a", [embedding, "model.layers.0.self_attn.q_proj.weight"], seed=1)
    perturbed_copy(base_dir, tmp_path / "b", [embedding, "model.layers.29.mlp.down_proj.weight"], seed=2)
    env = {**os.environ, "FORGE_CACHE": str(real_model_cache), "OMP_NUM_THREADS": "1"}
    for name in ("a", "b"):
        subprocess.run([FORGE, "edit", "diff", "--base", base_dir, "--tuned", tmp_path / name, "-o",
                        tmp_path / f"{name}.safetensors", "--quiet"], env=env, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, FORGE, "edit", "merge", "--base", base_dir, "--vector",
         tmp_path / "a.safetensors", "--vector", tmp_path / "b.safetensors", "-o", tmp_path / "merged", "--quiet"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    peak_bytes = int(result.stdout.split()[-1]) * 1024
    weights_bytes = (base_dir / "model.safetensors").stat().st_size
    assert peak_bytes <= 1.2 * weights_bytes, f"peak RSS {peak_bytes / 2**20:.0f} MiB"
    files = {name: safe_open(str(path), framework="pt") for name, path in [
        ("base", base_dir / "model.safetensors"), ("merged", tmp_path / "merged" / "model.safetensors"),
        ("a", tmp_path / "a" / "model.safetensors"), ("b", tmp_path / "b" / "model.safetensors")]}
    assert sorted(files["merged"].keys()) == sorted(files["base"].keys())
    for name in (embedding, "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.norm.weight"):
        base = files["base"].get_tensor(name)
        expected = base + ((files["a"].get_tensor(name) - base) + (files["b"].get_tensor(name) - base))
        assert torch.equal(files["merged"].get_tensor(name), expected), name
