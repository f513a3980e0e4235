from pathlib import Path

from medlora.modeling import load_tokenizer
from medlora.templates import load_template
from medlora.tokenize import IGNORE_INDEX, tokenize_records

RECORD = {"instruction": "糖尿病的典型症状有哪些？", "input": "", "output": "多饮、多尿、多食、体重下降。"}


def test_prompt_is_masked_and_answer_is_supervised_token_by_token(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    template = load_template("med_template")
    (example,), stats = tokenize_records([RECORD], template, tokenizer, cutoff_len=256)
    prompt_ids = tokenizer(template.build_prompt(RECORD["instruction"]))["input_ids"]
    answer_ids = tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(example["input_ids"][len(prompt_ids):-1]) == RECORD["output"]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert stats.n_supervised_tokens == len(answer_ids) + 1 and stats.n_truncated == 0


def test_train_on_inputs_supervises_everything(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    (example,), _ = tokenize_records([RECORD], load_template("med_template"), tokenizer, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_truncation_and_drops_are_counted(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    template = load_template("med_template")
    prompt_len = len(tokenizer(template.build_prompt(RECORD["instruction"]))["input_ids"])
    examples, stats = tokenize_records([RECORD], template, tokenizer, cutoff_len=prompt_len + 2)
    assert len(examples[0]["input_ids"]) == prompt_len + 2 and stats.n_truncated == 1
    examples, stats = tokenize_records([RECORD], template, tokenizer, cutoff_len=prompt_len)
    assert examples == [] and stats.n_dropped == 1 and stats.n_truncated == 1


def test_no_eos_when_disabled(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    (example,), _ = tokenize_records([RECORD], load_template("med_template"), tokenizer, add_eos_token=False)
    assert example["input_ids"][-1] != tokenizer.eos_token_id


def test_a_long_conversation_loses_its_oldest_turns_by_binary_search(tiny_model, monkeypatch):
    """2,000 turns: the fewest oldest turns are left out, found with O(log n) renderings, not one per turn."""
    import medlora.tokenize as tokenize

    tokenizer = load_tokenizer(tiny_model)
    template = load_template("med_template")
    history = [(f"第{i}问", f"第{i}答") for i in range(2000)]
    record = {"instruction": "最后的问题", "input": "", "output": "回答", "history": history}
    renders = []
    real = tokenize._pieces
    monkeypatch.setattr(tokenize, "_pieces", lambda *args: renders.append(1) or real(*args))
    examples, stats = tokenize_records([record], template, tokenizer, cutoff_len=200)
    kept = history[stats.n_turns_cut:]
    assert 0 < len(kept) < 2000 and len(examples[0]["input_ids"]) <= 200 and stats.n_truncated == 0
    one_more = tokenize_records([{**record, "history": history[stats.n_turns_cut - 1:]}], template, tokenizer,
                                cutoff_len=10**6)[0][0]
    assert len(one_more["input_ids"]) > 200  # keeping one more turn would not fit: the fewest were left out
    assert len(renders) <= 16  # 1 + log2(2000) + 1, where dropping turns one by one rendered 1,000+ times


def test_a_tokenizer_is_read_once_while_its_files_are_unchanged(tiny_model, tmp_path):
    import os
    import shutil

    from medlora.modeling import resolve_model_path

    folder = Path(shutil.copytree(resolve_model_path(tiny_model), tmp_path / "m",
                                  ignore=shutil.ignore_patterns("*.safetensors")))
    right, left = load_tokenizer(str(folder)), load_tokenizer(str(folder), padding_side="left")
    assert right is not left and (right.padding_side, left.padding_side) == ("right", "left")
    assert right._tokenizer is left._tokenizer  # one vocabulary read, two tokenizers
    assert right(["a", "bb bb"], padding=True)["input_ids"][0][0] != left(["a", "bb bb"], padding=True)["input_ids"][0][0]
    os.utime(folder / "tokenizer_config.json", ns=(1, 1))  # its files changed: read again
    assert load_tokenizer(str(folder))._tokenizer is not right._tokenizer
