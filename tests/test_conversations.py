"""Conversations: the three data formats, their one-line errors, training on every assistant turn as the template
renders it (token by token), and answering a follow-up that depends on the turn before (chat, serve, infer)."""

from __future__ import annotations

import json

import pytest

from conftest import FICTIONAL, LEARN_FLAGS, REPO, running_medlora, write_jsonl
from medlora.cli import main
from medlora.data import load_records
from medlora.errors import DataError
from medlora.templates import load_template
from medlora.tokenize import IGNORE_INDEX, tokenize_records

TURNS = [("头痛三天了。", "有发热吗？"), ("没有发热。", "可能是紧张性头痛。"), ("要吃药吗？", "可以短期服用布洛芬。")]
EXPECTED = {"instruction": "要吃药吗？", "input": "", "output": "可以短期服用布洛芬。", "system": "你是医生。",
            "history": [["头痛三天了。", "有发热吗？"], ["没有发热。", "可能是紧张性头痛。"]]}


def sharegpt(turns=TURNS, system="你是医生。") -> dict:
    head = [{"from": "system", "value": system}] if system else []
    return {"conversations": head + [{"from": who, "value": text} for pair in turns
                                     for who, text in zip(("human", "gpt"), pair)]}


def messages(turns=TURNS, system="你是医生。") -> dict:
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": who, "content": text} for pair in turns
                                for who, text in zip(("user", "assistant"), pair)]}


def test_the_three_formats_are_read_as_one_record(tmp_path):
    alpaca = {"instruction": TURNS[-1][0], "output": TURNS[-1][1], "system": "你是医生。",
              "history": [list(pair) for pair in TURNS[:-1]]}
    for name, row in (("sharegpt", sharegpt()), ("messages", messages()), ("alpaca", alpaca)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        assert load_records(path) == [EXPECTED]  # auto-detected from the file's first record
        assert load_records(path, data_format=name) == [EXPECTED]
    renamed = {"对话": sharegpt()["conversations"]}
    assert load_records(write_jsonl(tmp_path / "cols.jsonl", [renamed]), columns="conversations=对话") == [EXPECTED]
    # infer and eval may read a conversation that ends with the user's turn: there is no golden answer then
    open_ended = sharegpt()
    open_ended["conversations"].pop()
    assert load_records(write_jsonl(tmp_path / "open.jsonl", [open_ended]), require_output=False)[0]["output"] == ""


BAD = [
    ("starts with the assistant", lambda c: c["conversations"].pop(1),
     "turn 2: the conversation starts with an assistant turn; it must start with the user's"),
    ("no user turn", lambda c: c.update(conversations=c["conversations"][:1]), "the conversation has no user turn"),
    ("empty turn", lambda c: c["conversations"][3].update(value="  "), "turn 4: empty turn"),
    ("unknown role", lambda c: c["conversations"][1].update({"from": "doctor"}), "turn 2: unknown role 'doctor'"),
    ("ends with the user", lambda c: c["conversations"].pop(), "turn 6: the last turn is the user's"),
    ("not a list", lambda c: c.update(conversations="你好"), "field 'conversations' must be a non-empty list"),
    ("role a list", lambda c: c["conversations"][1].update({"from": ["human"]}),  # was: unhashable type
     "turn 2: field 'from' must be a string (one of human, user, gpt, assistant, system), got list"),
    ("role null", lambda c: c["conversations"][1].update({"from": None}), "turn 2: field 'from' must be a string"),
]


@pytest.mark.parametrize("name,spoil,message", BAD, ids=[case[0] for case in BAD])
def test_a_bad_conversation_is_named_by_file_line_and_turn(tmp_path, name, spoil, message):
    row = sharegpt()
    spoil(row)
    path = write_jsonl(tmp_path / "bad.jsonl", [sharegpt(), row])
    with pytest.raises(DataError) as caught:
        load_records(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: line 2: ") and message in text and len(text) <= 300, text


def test_a_data_file_and_a_server_request_with_the_same_messages_give_the_same_turns(tmp_path):
    """One rule for message order (turns.conversation_turns), as the Jinja and Ollama templates medlora exports
    render it: consecutive messages of one role are one turn, joined by a newline; system (and developer) messages,
    wherever they stand, are the system text. A file trains on the turns a request is answered from."""
    engine = pytest.importorskip("medlora.serve.engine")
    said = [("system", "你是医生。"), ("user", "头痛三天了。"), ("user", "有点恶心。"), ("assistant", "有发热吗？"),
            ("developer", "回答要简短。"), ("user", "没有发热。"), ("assistant", "可能是紧张性头痛。"),
            ("assistant", "注意休息。")]
    turns = [{"role": role, "content": text} for role, text in said]
    record = load_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}]))[0]
    assert record == {"instruction": "没有发热。", "input": "", "output": "可能是紧张性头痛。\n注意休息。",
                      "system": "你是医生。\n回答要简短。", "history": [["头痛三天了。\n有点恶心。", "有发热吗？"]]}
    sharegpt_names = {"user": "human", "assistant": "gpt", "system": "system"}
    as_sharegpt = [{"from": sharegpt_names[role], "value": text} for role, text in said if role != "developer"]
    assert load_records(write_jsonl(tmp_path / "s.jsonl", [{"conversations": as_sharegpt}]))[0]["history"] == \
        record["history"]
    system, question, history = engine.split_conversation(turns[:-2])  # the request asks the last question
    assert (system, question, history) == (record["system"], record["instruction"],
                                           [tuple(pair) for pair in record["history"]])
    # and both refuse a conversation that starts with the assistant, in one line
    with pytest.raises(DataError, match=r"line 1: turn 2: the conversation starts with an assistant turn"):
        load_records(write_jsonl(tmp_path / "bad.jsonl", [{"messages": turns[:1] + turns[3:]}]))
    with pytest.raises(engine.APIError, match="turn 2: the conversation starts with an assistant turn") as caught:
        engine.split_conversation(turns[:1] + turns[3:-2])
    assert caught.value.status == 400


def test_openai_content_parts_are_the_texts_joined(tmp_path):
    """Messages whose content is OpenAI's parts read as `medlora serve` reads a request's: the texts joined by a
    newline (they were called "empty"); a part that is not text is one line naming the turn and the part."""
    row = messages()
    row["messages"][1]["content"] = [{"type": "text", "text": "头痛"}, {"type": "text", "text": "三天了。"}]
    row["messages"][-1]["content"] = [{"type": "text", "text": "可以短期服用布洛芬。"}]
    [record] = load_records(write_jsonl(tmp_path / "parts.jsonl", [row]))
    assert record == {**EXPECTED, "history": [["头痛\n三天了。", "有发热吗？"], EXPECTED["history"][1]]}
    for part, message in (({"type": "image_url", "image_url": {"url": "x.png"}}, "got type 'image_url'"),
                          ("头痛", "got type 'str'"), ({"type": "text", "text": 3}, "got type 'text'")):
        row["messages"][1]["content"] = [{"type": "text", "text": "看图"}, part]
        with pytest.raises(DataError) as caught:
            load_records(write_jsonl(tmp_path / "bad.jsonl", [row]))
        text = str(caught.value)
        assert "line 1: turn 2: 'content' part 2: only text parts" in text and message in text, text
    row["messages"][1]["content"] = [{"type": "text", "text": " "}]
    with pytest.raises(DataError, match="line 1: turn 2: empty turn"):
        load_records(write_jsonl(tmp_path / "blank.jsonl", [row]))


def test_a_bad_conversation_stops_finetune_in_one_line_before_any_model(tiny_model, tmp_path, capsys):
    row = messages()
    row["messages"][2]["role"] = "tool"
    data = write_jsonl(tmp_path / "bad.jsonl", [messages(), messages(), row])
    out = tmp_path / "out"
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(data), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3: turn 3: unknown role 'tool'" in err[0] and not out.exists()


def supervised_pieces(example: dict) -> list[list[int]]:
    """The runs of supervised token ids of an example."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            runs, current = (runs + [current], []) if current else (runs, [])
        else:
            current.append(token)
    return runs + [current] if current else runs


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from medlora.modeling import load_tokenizer

    return load_tokenizer(tiny_model)


def test_chat_template_training_is_the_rendered_conversation_token_by_token(tokenizer):
    """tiny-qwen2 has Qwen2's real chat template: the example is its rendering, and exactly the assistant turns
    (each with its <|im_end|>, never the tokenizer's EOS <|endoftext|>) are supervised."""
    record = load_records_of([messages()])[0]
    [example], stats = tokenize_records([record], load_template("chat"), tokenizer, cutoff_len=512)
    chat = [{"role": "system", "content": "你是医生。"}, *messages(system="")["messages"]]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered.endswith("<|im_end|>\n")
    assert example["input_ids"] == tokenizer(rendered[:-1], add_special_tokens=False)["input_ids"]
    answers = [tokenizer.decode(run) for run in supervised_pieces(example)]
    assert answers == [f"{reply}<|im_end|>" for _, reply in TURNS]
    [last_only], _ = tokenize_records([record], load_template("chat"), tokenizer, cutoff_len=512,
                                      train_on_last_turn_only=True)
    assert [tokenizer.decode(run) for run in supervised_pieces(last_only)] == [f"{TURNS[-1][1]}<|im_end|>"]
    assert stats.n_conversations == 1 and stats.n_supervised_tokens == sum(map(len, supervised_pieces(example)))


def test_med_template_training_is_the_rendered_conversation_token_by_token(tokenizer):
    template = load_template("med_template")
    record = load_records_of([sharegpt(system="")])[0]
    [example], _ = tokenize_records([record], template, tokenizer, cutoff_len=512)
    text = "".join(template.render(record["instruction"], "", tokenizer, record["history"], answer=record["output"]))
    assert text.count("### 问题:") == 3 and text.count("<|endoftext|>") == 3
    assert example["input_ids"] == tokenizer(text)["input_ids"]
    assert [tokenizer.decode(run) for run in supervised_pieces(example)] == [f"{r}<|endoftext|>" for _, r in TURNS]


def test_a_long_conversation_loses_its_oldest_turns_first(tokenizer):
    template = load_template("med_template")
    record = load_records_of([sharegpt(system="")])[0]
    [full], _ = tokenize_records([record], template, tokenizer, cutoff_len=512)
    [cut], stats = tokenize_records([record], template, tokenizer, cutoff_len=len(full["input_ids"]) - 1)
    assert stats.n_turns_cut == 1 and stats.n_truncated == 0 and "1 oldest turn(s) left out" in stats.summary()
    assert [tokenizer.decode(run) for run in supervised_pieces(cut)] == [f"{r}<|endoftext|>" for _, r in TURNS[1:]]


def load_records_of(rows: list[dict]) -> list[dict]:
    from medlora.data import validate_record, detect_format

    return [validate_record(row, "test", data_format=detect_format(row)) for row in rows]


def test_the_server_prompt_of_a_conversation_is_the_training_rendering_up_to_the_answer(tiny_model):
    from medlora.config import ModelArgs
    from medlora.loader import load, template_for
    from medlora.serve.engine import Engine

    loaded = load(ModelArgs(tiny_model, dtype="fp32"))
    templates = {name: template_for(name, system="默认的系统提示。") for name in ("med_template", "chat")}
    engine = Engine(loaded.model, loaded.tokenizer, templates, tiny_model)
    chat = messages()["messages"]
    record = load_records_of([messages()])[0]
    for name, template in templates.items():
        prompt, _ = engine.chat_prompt(name, chat[:-1])
        pieces = template.render(record["instruction"], "", engine.text_tokenizer, record["history"],
                                 system=record["system"], answer=record["output"])
        assert prompt == "".join(pieces[:-1]) and "你是医生。" in prompt and "默认的系统提示。" not in prompt, name
        prompt, _ = engine.chat_prompt(name, chat[1:-1])  # no system message: the default one
        assert "默认的系统提示。" in prompt and "你是医生。" not in prompt


# --- a tiny adapter whose follow-up answer depends on the turn before ------------------------------------------

FIRST_TURNS = {"{name}用什么药？": lambda d: d["drugs"][0] + "。", "我得了{name}。": lambda d: "请及时就医。",
               "{name}有什么症状？": lambda d: d["symptoms"][0] + "。"}
FOLLOW_UP = "它挂什么科？"


@pytest.fixture(scope="module")
def follow_up_adapter(tiny_model, tmp_path_factory):
    """tiny-qwen2 tuned with its chat template on ShareGPT conversations whose second question, the same words
    every time, is answered by the department of the disease named in the first turn."""
    folder = tmp_path_factory.mktemp("followup")
    rows = [sharegpt([(first.format(name=d["name"]), reply(d)), (FOLLOW_UP, d["department"] + "。")], system="")
            for d in FICTIONAL for first, reply in FIRST_TURNS.items()]
    data = write_jsonl(folder / "train.jsonl", rows)
    out = folder / "adapter"
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(data), "--output_dir", str(out),
                 "--prompt_template", "chat", "--max_steps", "60", *LEARN_FLAGS]) == 0
    return out


def test_chat_answers_a_follow_up_from_the_turn_before(tiny_model, follow_up_adapter):
    from test_chat import PROMPT, exit_chat, spawn_chat

    child = spawn_chat("--base_model", tiny_model, "--lora_weights", str(follow_up_adapter), "--dtype", "fp32",
                       "--max_new_tokens", "8")
    try:
        for disease in FICTIONAL[:2]:
            child.sendline(f"我得了{disease['name']}。")  # answered 请及时就医。 whatever the disease
            child.expect_exact(PROMPT)
            child.sendline(FOLLOW_UP)
            child.expect_exact("回答> ")
            child.expect_exact(PROMPT)
            assert child.before.strip() == disease["department"] + "。", child.before
            child.sendline("/reset")
            child.expect_exact(PROMPT)
    finally:
        assert exit_chat(child) == 0


def test_the_server_answers_a_follow_up_from_the_turn_before(tiny_model, follow_up_adapter, tmp_path):
    from openai import OpenAI

    args = ["serve", "--base_model", tiny_model, "--lora_weights", f"followup={follow_up_adapter}", "--dtype", "fp32"]
    with running_medlora(args, tmp_path / "server.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for disease in FICTIONAL:
            reply = client.chat.completions.create(model="followup", max_tokens=8, messages=[
                {"role": "user", "content": f"{disease['name']}有什么症状？"},
                {"role": "assistant", "content": disease["symptoms"][0] + "。"},
                {"role": "user", "content": FOLLOW_UP}])
            assert reply.choices[0].message.content == disease["department"] + "。"


def test_infer_answers_the_last_turn_of_each_conversation(tiny_model, follow_up_adapter, tmp_path, capsys):
    asked = write_jsonl(tmp_path / "asked.jsonl", [
        sharegpt([(f"{d['name']}用什么药？", d["drugs"][0] + "。"), (FOLLOW_UP, d["department"] + "。")], system="")
        for d in FICTIONAL])
    out = tmp_path / "res"
    assert main(["infer", "--base_model", tiny_model, "--lora_weights", str(follow_up_adapter), "--instruct_dir",
                 str(asked), "--model_output_dir", str(out), "--max_new_tokens", "8", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("###history###") == 3 and f"用户: {FICTIONAL[0]['name']}用什么药？" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["golden"] for row in rows] == [d["department"] + "。" for d in FICTIONAL]
    assert [row["output"] for row in rows] == [row["golden"] for row in rows]
    assert rows[0]["history"] == [[f"{FICTIONAL[0]['name']}用什么药？", FICTIONAL[0]["drugs"][0] + "。"]]


def test_our_medical_conversations_tune_tiny_qwen2_with_its_chat_template_and_record_the_system_text(
        tiny_model, tmp_path):
    from medlora.generate import Generator

    data = REPO / "data" / "medchat" / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 200 and {len(row["conversations"]) // 2 for row in rows} == {2, 3, 4}
    out, some = tmp_path / "adapter", write_jsonl(tmp_path / "some.jsonl", rows[:12])  # the whole file: make test-slow
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(some), "--output_dir", str(out),
                 "--prompt_template", "chat", "--system", "你是一名医生。", "--max_steps", "1", "--batch_size", "4",
                 "--micro_batch_size", "4", "--cutoff_len", "512", "--dtype", "fp32"]) == 0
    assert json.loads((out / "medlora.json").read_text(encoding="utf-8"))["system"] == "你是一名医生。"
    generator = Generator.load(tiny_model, str(out), dtype="fp32")
    assert generator.build_prompt("头痛怎么办？").startswith("<|im_start|>system\n你是一名医生。<|im_end|>")
    other = Generator.load(tiny_model, str(out), dtype="fp32", system="")  # --system "" drops it
    assert other.build_prompt("头痛怎么办？").startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_a_follow_up_gets_the_facts_of_the_disease_an_earlier_turn_named(knowledge_file):
    from medlora.databuild.noise import knowledge_for_training
    from medlora.knowledge import KnowledgeIndex

    index = KnowledgeIndex.load(str(knowledge_file))
    found = index.retrieve("它用什么药？", context=["石垣病挂什么科？"])
    assert found.diseases == ["石垣病"] and "乙洛芬" in found.text()
    assert index.retrieve("它用什么药？").diseases == []  # no earlier turn: nothing to go on
    assert index.retrieve("青岚热用什么药？", context=["石垣病挂什么科？"]).diseases == ["青岚热"]  # named now: that one
    record = {"instruction": "它用什么药？", "input": "", "output": "乙洛芬。", "history": [["石垣病挂什么科？", "骨科。"]]}
    [trained], _ = knowledge_for_training([record], index)
    assert "乙洛芬" in trained["knowledge"]


@pytest.mark.slow
def test_all_our_conversations_tune_tiny_qwen2_with_its_chat_template(tiny_model, tmp_path):
    data = REPO / "data" / "medchat" / "train.jsonl"
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(data), "--output_dir", str(tmp_path / "a"),
                 "--prompt_template", "chat", "--max_steps", "1", "--batch_size", "4", "--micro_batch_size", "4",
                 "--cutoff_len", "512", "--dtype", "fp32"]) == 0


def test_medlora_data_chat_rebuilds_our_conversations_byte_for_byte(tmp_path):
    assert main(["data", "chat", "--out", str(tmp_path)]) == 0
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (REPO / "data" / "medchat" / f"{split}.jsonl").read_bytes()
    test_diseases = {json.loads(line)["disease"] for line in (tmp_path / "test.jsonl").read_text().splitlines()}
    train_diseases = {json.loads(line)["disease"] for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    assert test_diseases and not test_diseases & train_diseases  # split by disease
