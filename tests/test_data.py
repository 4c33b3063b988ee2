"""Tests of llmforge.data: readers, prompt formats, label masking and batching."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmforge.data import (
    IGNORE_INDEX,
    INSTRUCTION_INPUT_TEMPLATE,
    Example,
    TokenizedExample,
    TokenizeStats,
    collate,
    make_batches,
    read_records,
    resolve_data_path,
    to_examples,
    tokenize_examples,
)
from llmforge.errors import ForgeError


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# Readers


def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    records = read_records(path)
    assert records == [{"a": 1}, {"a": 2}]
    assert records.lines == [1, 3]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n{"a": 2\n')
    with pytest.raises(ForgeError, match=rf"^{path}:2: invalid JSON"):
        read_records(path)


def test_jsonl_non_object_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(ForgeError, match=rf"{path}:2: expected a JSON object, got list"):
        read_records(path)


def test_json_array(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"text": "x"}, {"text": "y"}]))
    assert read_records(path) == [{"text": "x"}, {"text": "y"}]


def test_json_syntax_error_has_line(tmp_path):
    path = write(tmp_path / "d.json", '[\n{"text": "x"},\n{"text" "y"}\n]')
    with pytest.raises(ForgeError, match=rf"{path}:3: invalid JSON"):
        read_records(path)


def test_json_not_an_array(tmp_path):
    path = write(tmp_path / "d.json", '{"text": "x"}')
    with pytest.raises(ForgeError, match="expected a JSON array"):
        read_records(path)


def test_csv_with_quoted_newline(tmp_path):
    path = write(tmp_path / "d.csv", 'question,answer\n"two\nlines",4\nplain,5\n')
    records = read_records(path)
    assert records == [{"question": "two\nlines", "answer": "4"}, {"question": "plain", "answer": "5"}]
    assert records.lines == [2, 4]


def test_csv_missing_column_reports_line(tmp_path):
    path = write(tmp_path / "d.csv", "question,answer,source\nq1,1,x\nq2,2\n")
    with pytest.raises(ForgeError, match=rf"{path}:3: missing column\(s\) source"):
        read_records(path)


def test_csv_extra_field_reports_line(tmp_path):
    path = write(tmp_path / "d.csv", "question,answer\nq1,1,extra\n")
    with pytest.raises(ForgeError, match=rf"{path}:2: the row has 3 fields"):
        read_records(path)


def test_tsv(tmp_path):
    path = write(tmp_path / "d.tsv", "prompt\tcompletion\nhi, there\t yes\n")
    assert read_records(path) == [{"prompt": "hi, there", "completion": " yes"}]


def test_txt_one_record_per_paragraph(tmp_path):
    path = write(tmp_path / "d.txt", "first line\nsecond line\n\n\nnext paragraph\n")
    records = read_records(path)
    assert records == [{"text": "first line\nsecond line"}, {"text": "next paragraph"}]
    assert records.lines == [1, 5]


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path / "d.jsonl", "\ufeff" + '{"text": "é"}\n')
    assert read_records(path) == [{"text": "é"}]


def test_bad_encoding_names_file(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ForgeError, match=rf"{path}:2: invalid UTF-8 byte 0xe9"):
        read_records(path)


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", "[]"),
                                        ("e.csv", "a,b\n"), ("e.csv", ""), ("e.txt", "\n\n")])
def test_empty_file_raises(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(ForgeError, match="no records found"):
        read_records(path)


def test_unknown_suffix_needs_format(tmp_path):
    path = write(tmp_path / "d.dat", '{"a": 1}\n')
    with pytest.raises(ForgeError, match="cannot tell the format"):
        read_records(path)
    assert read_records(path, fmt="jsonl") == [{"a": 1}]


def test_resolve_demo_and_plain_paths(tmp_path):
    assert resolve_data_path("demo:arith/train.jsonl").is_file()
    path = write(tmp_path / "d.jsonl", "{}\n")
    assert resolve_data_path(str(path)) == path
    with pytest.raises(ForgeError, match="demo:arith/test.jsonl"):
        resolve_data_path("demo:nope.jsonl")
    with pytest.raises(ForgeError, match="data file not found"):
        resolve_data_path(str(tmp_path / "missing.jsonl"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
records_strategy = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=8)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(records=records_strategy, ensure_ascii=st.booleans())
def test_jsonl_round_trip_property(tmp_path, records, ensure_ascii):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    read = read_records(path)
    assert read == records
    assert read.lines == list(range(1, len(records) + 1))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(records=records_strategy, bad_line=st.integers(min_value=0, max_value=7),
       garbage=st.sampled_from(["{", "nope", '{"a": }', "[1", '"text"']))
def test_jsonl_malformed_line_property(tmp_path, records, bad_line, garbage):
    lines = [json.dumps(r) for r in records]
    bad_line = min(bad_line, len(lines))
    lines.insert(bad_line, garbage)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ForgeError, match=rf"^{path}:{bad_line + 1}: "):
        read_records(path)


# Prompt formats


def test_text_format_has_no_prompt():
    assert to_examples([{"text": "hello"}]) == [Example("", "hello")]


def test_prompt_completion_format():
    assert to_examples([{"prompt": "2+2=", "completion": " 4"}]) == [Example("2+2=", " 4")]


def test_instruction_format_with_and_without_input():
    examples = to_examples([{"instruction": "Add.", "input": "2 3", "output": "5"},
                            {"instruction": "Say hi.", "output": "hi"}])
    assert examples[0] == Example(INSTRUCTION_INPUT_TEMPLATE.format(instruction="Add.", input="2 3"), "5")
    assert examples[1] == Example("### Instruction:\nSay hi.\n\n### Response:\n", "hi")


def test_question_answer_records_use_demo_template():
    assert to_examples([{"question": "1+1?", "answer": "2"}]) == [Example("Question: 1+1?\nAnswer:", " 2")]


def test_column_mapping():
    examples = to_examples([{"q": "a", "a": "b"}], columns={"prompt": "q", "completion": "a"})
    assert examples == [Example("a", "b")]


def test_column_mapping_missing_source_names_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"q": "a", "a": "b"}\n{"q": "c"}\n')
    with pytest.raises(ForgeError, match=rf"{path}:2: missing field 'a'"):
        to_examples(read_records(path), columns={"prompt": "q", "completion": "a"})


def test_column_mapping_unknown_field_lists_valid_ones():
    with pytest.raises(ForgeError, match=r"invalid column mapping bogus=question: 'bogus' .* text, prompt, "
                                         r"completion, instruction, input, output, messages"):
        to_examples([{"question": "a", "answer": "b"}], columns={"bogus": "question"})


def test_column_mapping_checked_through_finetune_parser():
    from llmforge_finetune.cli import parse_columns

    with pytest.raises(ForgeError, match="'bogus' is not a field of any data format"):
        to_examples([{"question": "a", "answer": "b"}], columns=parse_columns(("bogus=question",)))


@pytest.mark.parametrize(
    ("line", "fmt"),
    [('{"text": ""}', "auto"), ('{"prompt": "", "completion": ""}', "auto"),
     ('{"prompt": "2+2=", "completion": ""}', "prompt-completion"),
     ('{"instruction": "Say hi.", "output": ""}', "auto")],
)
def test_empty_completion_names_line(tmp_path, line, fmt):
    path = write(tmp_path / "d.jsonl", line + "\n" + line + "\n")
    with pytest.raises(ForgeError, match=rf"^{path}:1: empty completion; there is nothing to train on"):
        to_examples(read_records(path), fmt=fmt)


def test_empty_completion_after_good_records(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "fine"}\n\n{"text": ""}\n')
    with pytest.raises(ForgeError, match=rf"^{path}:3: empty completion"):
        to_examples(read_records(path))


def test_empty_completion_template(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"q": "x", "a": ""}\n')
    with pytest.raises(ForgeError, match=rf"^{path}:1: empty completion"):
        to_examples(read_records(path), prompt_template="{q}", completion_template="{a}")


def test_tokenize_rejects_empty_completion(tokenizer):
    with pytest.raises(ForgeError, match="example 2: empty completion"):
        tokenize_examples([Example("a", "b"), Example("", "")], tokenizer, max_length=16)


def test_templates_fill_from_fields():
    records = [{"question": "3*4?", "answer": 12, "unit": "apples"}]
    examples = to_examples(records, prompt_template="Q: {question}\nA:", completion_template=" {answer} {unit}")
    assert examples == [Example("Q: 3*4?\nA:", " 12 apples")]


def test_template_missing_field_is_reported(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"question": "x"}\n')
    with pytest.raises(ForgeError, match=rf"{path}:1: the template .* missing field 'answer'"):
        to_examples(read_records(path), prompt_template="{question}", completion_template="{answer}")


def test_auto_detection_failure_lists_fields():
    with pytest.raises(ForgeError, match="cannot detect the data format from the fields foo"):
        to_examples([{"foo": "bar"}])


def test_explicit_format_missing_field():
    with pytest.raises(ForgeError, match="record 2: missing field 'completion'"):
        to_examples([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], fmt="prompt-completion")


def test_chat_format_splits_at_last_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    [example] = to_examples([{"messages": messages}], tokenizer)
    expected_prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert example.prompt == expected_prompt
    assert example.prompt.endswith("<|im_start|>assistant\n")
    assert example.completion == "4<|im_end|>"


def test_chat_last_turn_must_be_assistant(tokenizer):
    with pytest.raises(ForgeError, match="last message must have role 'assistant'"):
        to_examples([{"messages": [{"role": "user", "content": "hi"}]}], tokenizer)


@pytest.mark.parametrize("role", ["system", "user", "tool"])
def test_chat_accepts_standard_roles(tokenizer, role):
    messages = [{"role": role, "content": "x"}, {"role": "assistant", "content": "y"}]
    [example] = to_examples([{"messages": messages}], tokenizer)
    assert example.completion == "y<|im_end|>"


def test_chat_unknown_role_names_line_and_role(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "boo"},
                {"role": "assistant", "content": "ok"}]
    path = write(tmp_path / "d.jsonl", json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ForgeError, match=rf"^{path}:1: message 2 has the unknown role 'wizard'; "
                                         "use one of: system, user, assistant, tool"):
        to_examples(read_records(path), tokenizer)


@pytest.mark.parametrize("content", [None, 42, ["a", "b"], {"text": "a"}])
def test_chat_content_must_be_string(tokenizer, tmp_path, content):
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]
    path = write(tmp_path / "d.jsonl", "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ForgeError, match=rf"^{path}:2: the content of message 1 \(user\) must be a string, "
                                         rf"got {type(content).__name__}"):
        to_examples(read_records(path), tokenizer)


# Tokenization and label masking


def test_labels_mask_prompt_token_by_token(tokenizer):
    [item] = tokenize_examples([Example("Question: 2+2?\nAnswer:", " 4")], tokenizer, max_length=64)
    prompt_ids = tokenizer("Question: 2+2?\nAnswer:")["input_ids"]
    completion_ids = tokenizer(" 4", add_special_tokens=False)["input_ids"]
    assert item.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert item.labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert item.labels[len(prompt_ids):] == completion_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(item.input_ids[len(prompt_ids):]) == " 4" + tokenizer.eos_token


def test_text_examples_train_on_all_tokens(tokenizer):
    [item] = tokenize_examples([Example("", "hello world")], tokenizer, max_length=64)
    assert all(label != IGNORE_INDEX for label in item.labels)
    assert item.labels == item.input_ids


def test_chat_completion_gets_no_second_eos(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    examples = to_examples([{"messages": messages}], tokenizer)
    [item] = tokenize_examples(examples, tokenizer, max_length=128)
    assert tokenizer.eos_token == "<|im_end|>"
    completion = [t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(completion) == "hello<|im_end|>"
    assert completion.count(tokenizer.eos_token_id) == 1
    assert item.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_is_counted_and_logged(tokenizer, caplog):
    examples = [Example("short", " yes"), Example("word " * 50, " no"), Example("", "long text " * 40)]
    stats = TokenizeStats()
    with caplog.at_level("WARNING", logger="llmforge.data"):
        items = tokenize_examples(examples, tokenizer, max_length=16, stats=stats)
    assert stats.truncated == 2
    assert stats.dropped == 1
    assert len(items) == 2
    assert all(len(item.input_ids) <= 16 for item in items)
    assert "2 of 3 examples are longer than max_length=16" in caplog.text


def test_all_examples_dropped_raises(tokenizer):
    with pytest.raises(ForgeError, match="raise --max-length"):
        tokenize_examples([Example("word " * 50, " no")], tokenizer, max_length=8)


# Batching


def test_collate_pads_right_with_ignored_labels():
    batch = collate([TokenizedExample([1, 2, 3], [-100, 2, 3]), TokenizedExample([4], [4])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.tokens == 4


def test_make_batches_covers_every_example_once_and_groups_lengths():
    examples = [TokenizedExample(list(range(n)), list(range(n))) for n in [1 + (i * 7) % 30 for i in range(100)]]
    batches = make_batches(examples, 8, pad_token_id=0, seed=3)
    assert sum(b.input_ids.shape[0] for b in batches) == 100
    assert sum(b.tokens for b in batches) == sum(len(e.input_ids) for e in examples)
    padding = sum(b.input_ids.numel() - b.tokens for b in batches)
    assert padding < 0.1 * sum(b.tokens for b in batches)


def test_make_batches_is_seeded():
    examples = [TokenizedExample([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(40)]
    first = [b.input_ids.tolist() for b in make_batches(examples, 4, pad_token_id=0, seed=1)]
    again = [b.input_ids.tolist() for b in make_batches(examples, 4, pad_token_id=0, seed=1)]
    other = [b.input_ids.tolist() for b in make_batches(examples, 4, pad_token_id=0, seed=2)]
    assert first == again
    assert first != other


def test_printable_field_names_survive_templates():
    fields = {name: name.upper() for name in string.ascii_lowercase[:5]}
    template = "".join("{" + name + "}" for name in fields)
    assert to_examples([fields], prompt_template=template, completion_template="x") == [
        Example("ABCDE", "x")]
