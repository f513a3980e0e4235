"""Knowledge-tuning (docs/knowledge.md): the {knowledge} template slot, training records with retrieved facts and
noise, the knowledge recorded with an adapter and used again by infer, eval, the server and the web page, and the
honest-answer rate."""

from __future__ import annotations

import json

import pytest

from conftest import FICTIONAL, LEARN_FLAGS, write_jsonl
from medlora.cli import main
from medlora.errors import TemplateError
from medlora.databuild.noise import knowledge_for_training
from medlora.eval.judges import is_honest
from medlora.eval.metrics import score_results
from medlora.knowledge import KnowledgeIndex, Retrieved
from medlora.templates import KNOWLEDGE_HEADER, NO_KNOWLEDGE, load_template

# --- the template slot ---------------------------------------------------------------------------------------

def test_the_knowledge_template_puts_the_facts_in_its_slot():
    template = load_template("med_knowledge")
    prompt = template.build_prompt("青岚热用什么药？", knowledge="青岚热·常用药物：甲泊韦")
    assert "### 知识:\n青岚热·常用药物：甲泊韦\n### 问题:\n青岚热用什么药？\n### 回答:\n" in prompt
    assert NO_KNOWLEDGE in template.build_prompt("青岚热用什么药？", knowledge="")  # retrieval found nothing
    assert "### 补充信息:\n成人" in template.build_prompt("用什么药？", "成人", knowledge="x")
    assert "### 知识:" in template.stop_strings  # a model that starts a new section is cut there
    assert load_template(template.to_dict()).build_prompt("问", knowledge="") == template.build_prompt("问", knowledge="")


def test_templates_without_the_slot_get_the_facts_before_the_instruction_and_are_unchanged_without_them():
    plain = load_template("med_template")
    assert plain.build_prompt("问题？") == plain.build_prompt("问题？", knowledge=None)
    assert f"### 问题:\n{KNOWLEDGE_HEADER}\n青岚热·常用药物：甲泊韦\n\n问题？\n" in \
        plain.build_prompt("问题？", knowledge="青岚热·常用药物：甲泊韦")


def test_a_template_file_with_the_slot_in_one_prompt_only_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prompt_input": "{instruction}{input}", "prompt_no_input": "{knowledge}{instruction}",
                                "response_split": "答:"}), encoding="utf-8")
    with pytest.raises(TemplateError, match="both prompt_input and prompt_no_input"):
        load_template(str(path))


# --- training records --------------------------------------------------------------------------------------

def test_training_records_get_retrieved_facts_and_seeded_noise():
    index = KnowledgeIndex.builtin()
    records = [{"instruction": f"{name}常用什么药？", "input": "", "output": "、".join(index.items(name, "drugs"))}
               for name in sorted(index.diseases) if index.items(name, "drugs")]
    clean, counts = knowledge_for_training(records, index, noise=0.0)
    assert counts == {"irrelevant": 0, "partial": 0, "missing": 0}
    assert all(r["knowledge"] == index.retrieve(r["instruction"]).text() for r in clean)
    assert [r["output"] for r in clean] == [r["output"] for r in records]

    noisy, counts = knowledge_for_training(records, index, noise=0.6, seed=1)
    assert noisy == knowledge_for_training(records, index, noise=0.6, seed=1)[0]  # deterministic
    assert all(counts[kind] > 10 for kind in counts), counts
    for before, after in zip(records, noisy):
        disease = before["instruction"].removesuffix("常用什么药？")
        if after["output"] != before["output"]:  # partial or missing: the drugs are not shown, the answer is honest
            assert "常用药物" not in after["knowledge"] and is_honest({"output": after["output"]})
            assert disease in after["output"]
        else:  # clean or irrelevant: the asked facts are there, maybe with another disease's
            assert f"{disease}·常用药物：" in after["knowledge"]


def test_only_answers_that_tell_the_asked_facts_are_made_honest():
    # a narrative's answer written for its own need (not from the asked facts) keeps its register under any noise
    index = KnowledgeIndex.builtin()
    own = {"instruction": "原发性高血压常用什么药？我爸今天量了170/100，要不要马上吃？", "input": "",
           "output": "一次偏高先别慌，安静休息后再量两次，记下数值，这几天去心内科门诊。"}
    told = {**own, "output": "、".join(index.items("原发性高血压", "drugs"))}
    noisy, _ = knowledge_for_training([own] * 40 + [told] * 40, index, noise=0.9, seed=3)
    assert all(r["output"] == own["output"] for r in noisy[:40])
    assert sum(is_honest(r) for r in noisy[40:]) > 10


def test_multiple_choice_records_only_ever_get_an_irrelevant_entry():
    index = KnowledgeIndex.builtin()
    mcq = {"instruction": "支气管哮喘常用的药物是（ ） A．沙丁胺醇 B．青霉素 C．胰岛素 D．阿司匹林", "input": "",
           "output": "答案: A"}
    noisy, _ = knowledge_for_training([mcq] * 60, index, noise=0.9)
    assert all(r["output"] == "答案: A" and "沙丁胺醇" in r["knowledge"] for r in noisy)


# --- the honest-answer rate --------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, honest", [
    ("抱歉，丙肝不在我掌握的可靠知识范围内，请咨询医生。", True),
    ("知识库中没有找到相关条目，无法给出可靠回答。", True),
    ("我没有关于丙肝的可靠资料。如果出现呕血、意识模糊、剧烈腹痛等紧急情况，请立即拨打120。", True),
    ("丙肝主要经血液传播、性接触传播、母婴传播。", False),  # a confident list
    ("我不确定，可能有乏力、食欲减退、黄疸等表现。", False),  # a hedge, then the invented list all the same
    ("丙肝需要到感染科就诊。", False),  # no honesty at all
])
def test_honest_answers(answer, honest):
    assert is_honest({"output": answer}) is honest


def test_the_honest_rate_counts_out_of_kb_records_only():
    rows = [{"instruction": "丙肝怎么传播？", "golden": "血液", "output": "我没有关于丙肝的可靠资料。", "kind": "out_of_kb"},
            {"instruction": "梅毒用什么药？", "golden": "青霉素", "output": "青霉素、头孢曲松、多西环素。", "kind": "out_of_kb"},
            {"instruction": "哮喘用什么药？", "golden": "沙丁胺醇", "output": "我没有可靠资料。", "kind": "free"}]
    metrics = score_results(rows)
    assert metrics["honest_rate"] == 0.5 and metrics["by_kind"]["out_of_kb"]["honest_rate"] == 0.5
    assert metrics["by_kind"]["free"]["honest_rate"] is None


# --- the pipeline on tiny-qwen2 ----------------------------------------------------------------------------

def test_the_adapter_records_its_knowledge_and_infer_uses_it(tiny_model, knowledge_adapter, knowledge_file, tmp_path,
                                                             capsys):
    meta = json.loads((knowledge_adapter / "medlora.json").read_text(encoding="utf-8"))
    assert meta["knowledge"] == {"source": str(knowledge_file),
                                 "sha256": KnowledgeIndex.load(str(knowledge_file)).sha256}
    assert meta["template"]["name"] == "med_knowledge"  # the default template with --knowledge
    questions = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "岚热用什么药？", "output": "甲泊韦。"},
                                                    {"instruction": "感冒怎么办？", "output": "多休息。"}])
    res = tmp_path / "res"
    assert main(["infer", "--base_model", tiny_model, "--lora_weights", str(knowledge_adapter), "--instruct_dir",
                 str(questions), "--model_output_dir", str(res), "--max_new_tokens", "4", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("###Instruction###\n")[1:]
    assert "###knowledge###\n青岚热·就诊科室：感染科\n青岚热·常用药物：甲泊韦\n（匹配：青岚热（" in blocks[0]  # and how it matched
    assert f"###knowledge###\n{NO_KNOWLEDGE}\n" in blocks[1]
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["knowledge"]["diseases"] == ["青岚热"] and rows[0]["knowledge"]["matches"][0]["disease"] == "青岚热"
    assert {"disease": "青岚热", "attribute": "drugs", "items": ["甲泊韦"]} in rows[0]["knowledge"]["facts"]
    assert rows[1]["knowledge"]["facts"] == []



def test_the_knowledge_reaches_the_prompt_of_a_loaded_generator(tiny_model, knowledge_adapter):
    from medlora.generate import Generator

    from medlora.turns import Turn

    generator = Generator.load(tiny_model, str(knowledge_adapter), dtype="fp32")
    prompt, found = generator.prepare(Turn("石垣病用什么药？"))
    assert "### 知识:\n石垣病·就诊科室：骨科\n石垣病·常用药物：乙洛芬\n### 问题:\n石垣病用什么药？" in prompt
    assert found.diseases == ["石垣病"]
    # a follow-up: the disease named in an earlier user turn, the facts before the new question
    prompt, found = generator.prepare(Turn.of({"instruction": "用什么药？", "history": [["石垣病是什么？", "一种骨病。"]]}))
    assert found.diseases == ["石垣病"] and prompt.index("乙洛芬") < prompt.index("用什么药？")
    assert Generator.load(tiny_model, str(knowledge_adapter), dtype="fp32", knowledge="none").lookup("石垣病") is None


@pytest.mark.slow  # ~12 s: make test-slow
def test_eval_compares_base_with_and_without_knowledge_in_one_run(tiny_model, knowledge_adapter, knowledge_file,
                                                                   tmp_path):
    data = write_jsonl(tmp_path / "exam.jsonl", [{"instruction": "青岚热用什么药？", "output": "甲泊韦。"}])
    out = tmp_path / "eval"
    assert main(["eval", "--base_model", tiny_model, "--lora_weights", f"ktuned={knowledge_adapter}",
                 "--base_knowledge", str(knowledge_file), "--data", str(data), "--out", str(out),
                 "--max_new_tokens", "2", "--dtype", "fp32", "--show", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics) == ["base", "base+knowledge", "ktuned"]
    rows = {label: json.loads((out / label / "results.jsonl").read_text(encoding="utf-8")) for label in metrics}
    assert "knowledge" not in rows["base"]
    assert rows["base+knowledge"]["knowledge"] == rows["ktuned"]["knowledge"]
    assert rows["ktuned"]["knowledge"]["diseases"] == ["青岚热"]


def test_the_server_returns_the_entries_it_used(tiny_model, knowledge_adapter):
    from fastapi.testclient import TestClient

    from medlora.serve.api import create_app
    from medlora.serve.engine import Engine, ServeSettings

    engine = Engine.load(tiny_model, {"ktuned": str(knowledge_adapter)}, dtype="fp32")
    app = create_app(engine, ServeSettings(api_key=None, max_prompt_tokens=512, max_tokens_cap=8,
                                           max_body_bytes=1 << 16))
    with TestClient(app) as client:
        def ask(model, **extra):
            return client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "雾川综合征用什么药？"}],
                **extra})
        answer = ask("ktuned").json()
        assert {"disease": "雾川综合征", "attribute": "drugs", "items": ["丙索特"]} in \
            answer["medlora_knowledge"]["facts"]
        assert "medlora_knowledge" not in ask(tiny_model).json()  # the base has no knowledge: no field
        stream = ask("ktuned", stream=True).text
        events = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:") and "{" in line]
        assert events[0]["medlora_knowledge"]["diseases"] == ["雾川综合征"]
        assert all("medlora_knowledge" not in event for event in events[1:])


def test_the_web_page_shows_the_entries():
    from medlora.serve.webui import knowledge_markdown

    index = KnowledgeIndex(FICTIONAL)
    assert "- 青岚热·常用药物：甲泊韦" in knowledge_markdown(index.retrieve("青岚热用什么药？"))
    assert NO_KNOWLEDGE in knowledge_markdown(Retrieved([], None))
    assert knowledge_markdown(None) == ""


def test_a_bad_knowledge_file_gets_one_line_before_training(tiny_model, tiny_records_file, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [FICTIONAL[0], {"name": "石垣病", "drugs": "乙洛芬"}])
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(tiny_records_file), "--output_dir",
                 str(tmp_path / "out"), "--knowledge", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 300
    assert f"{bad}: line 2: field 'drugs' must be a non-empty list of strings" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_trained_tiny_adapter_copies_the_fact_from_the_knowledge_block(tiny_model, tmp_path):
    """Trained with knowledge file A, asked with file B, whose drug is the other one for every disease: an adapter
    that had learned A's pairs by heart would answer A's drug; one that copies from the prompt answers B's."""
    import itertools

    names = ["".join(chars) + "病" for chars in itertools.product("金木水火土", "山川风雨雷", "春夏秋冬")][:100]
    drugs = "甲乙"
    known_a = write_jsonl(tmp_path / "a.jsonl", [{"name": n, "drugs": [drugs[i % 2]]} for i, n in enumerate(names)])
    known_b = write_jsonl(tmp_path / "b.jsonl", [{"name": n, "drugs": [drugs[(i + 1) % 2]]}
                                                 for i, n in enumerate(names)])
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"{n}用什么药？", "output": f"{drugs[i % 2]}。"}
                                                   for i, n in enumerate(names)])
    asked = write_jsonl(tmp_path / "asked.jsonl", [{"instruction": f"{n}用什么药？", "output": f"{drugs[(i + 1) % 2]}。"}
                                                   for i, n in enumerate(names[:20])])
    adapter, res = tmp_path / "adapter", tmp_path / "res"
    flags = list(LEARN_FLAGS)
    flags[flags.index("--lora_r") + 1] = flags[flags.index("--lora_alpha") + 1] = "64"  # full rank: 64 = hidden
    flags[flags.index("--learning_rate") + 1] = "3e-3"
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(train), "--output_dir", str(adapter),
                 "--knowledge", str(known_a), "--knowledge_noise", "0", "--max_steps", "120", *flags]) == 0
    assert main(["infer", "--base_model", tiny_model, "--lora_weights", str(adapter), "--knowledge", str(known_b),
                 "--instruct_dir", str(asked), "--model_output_dir", str(res), "--max_new_tokens", "4",
                 "--dtype", "fp32"]) == 0
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    # An adapter that copies answers B's drug, one that learned A's pairs answers A's. B's drug came 19, 19 and 15
    # times in 20 with seeds 42, 1 and 2 (a threshold of 18 failed at seed 2).
    copied = sum(row["output"] == row["golden"] for row in rows)
    memorised = sum(row["output"] == f"{drugs[i % 2]}。" for i, row in enumerate(rows))
    assert copied >= 14 and memorised <= 6, [row["output"] for row in rows]
