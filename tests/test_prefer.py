"""The preference stage (medlora finetune --stage dpo|kto, medlora.prefer) and its pair files (medlora.data.pair_record):
what the pairs teach is learned, the reference stays where it started, and bad pair files get one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import LEARN_FLAGS, TINY_RECORDS, run_medlora, write_jsonl
from medlora.data import load_records

pytest.importorskip("trl")

# Chosen: the record's answer. Rejected: the same answer with one fact changed (our own wording).
WRONG = {"鼻塞、流涕、咽痛。": "鼻塞、流涕、便血。", "心内科。": "骨科。", "多饮、多尿、多食、体重下降。": "多饮、多尿、多食、体重上升。",
         "结核分枝杆菌。": "金黄色葡萄球菌。", "硫酸亚铁。": "阿司匹林。", "沙丁胺醇吸入。": "布洛芬口服。",
         "血液、母婴和性接触传播。": "空气和飞沫传播。", "秋水仙碱。": "青霉素。"}
PAIRS = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": WRONG[r["output"]]}
         for r in TINY_RECORDS]


def _formats(pair: dict) -> dict[str, dict]:
    question = pair["instruction"] + pair["input"]
    user = [{"role": "user", "content": question}]
    return {
        "llamafactory_alpaca": {**pair, "input": ""} | {"instruction": question},
        "trl_text": {"prompt": question, "chosen": pair["chosen"], "rejected": pair["rejected"]},
        "trl_messages": {"prompt": user, "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                         "rejected": [{"role": "assistant", "content": pair["rejected"]}]},
        "trl_implicit": {"chosen": user + [{"role": "assistant", "content": pair["chosen"]}],
                         "rejected": user + [{"role": "assistant", "content": pair["rejected"]}]},
        "llamafactory_sharegpt": {"conversations": [{"from": "human", "value": question}],
                                  "chosen": {"from": "gpt", "value": pair["chosen"]},
                                  "rejected": {"from": "gpt", "value": pair["rejected"]}},
        "medicalgpt": {"system": "", "history": [], "question": question, "response_chosen": pair["chosen"],
                       "response_rejected": pair["rejected"]},
    }


def test_every_pair_format_loads_as_the_same_pairs(tmp_path):
    loaded = {}
    for name in _formats(PAIRS[0]):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [_formats(p)[name] for p in PAIRS])
        loaded[name] = [(r["instruction"], r["output"], r["rejected"]) for r in load_records(path, pairs=True)]
    expected = [(p["instruction"] + p["input"], p["chosen"], p["rejected"]) for p in PAIRS]
    assert all(rows == expected for rows in loaded.values()), loaded


BAD_PAIRS = [
    ({"prompt": "问", "chosen": "甲"}, "line 2: field 'rejected' is missing"),
    ({"prompt": "问", "chosen": "甲", "rejected": "甲"}, "line 2: the chosen and rejected answers are the same"),
    ({"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "human", "value": "甲"},
      "rejected": {"from": "gpt", "value": "乙"}}, "line 2: field 'chosen' must end with an assistant turn"),
    ({"instruction": "问", "chosen": "甲", "rejected": 3}, "line 2: field 'rejected' must be non-empty text"),
    ({"prompt": "问", "chosen": "甲", "rejected": "乙", "knowledge": ["x"]}, "line 2: field 'knowledge' must be a string"),
    ({"chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "甲"}],
      "rejected": [{"role": "user", "content": "另一问"}, {"role": "assistant", "content": "乙"}]},
     "line 2: 'chosen' and 'rejected' must share every turn but the last"),
]


@pytest.mark.parametrize("row, message", BAD_PAIRS)
def test_a_bad_pair_is_named_by_file_line_and_field(tmp_path, row, message):
    from medlora.errors import DataError

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "问", "chosen": "甲", "rejected": "乙"}, row])
    with pytest.raises(DataError) as caught:
        load_records(data, pairs=True)
    assert str(caught.value).startswith(f"{data}: {message}") and len(str(caught.value)) <= 300


def test_the_preference_stage_refuses_a_bad_pair_file_in_one_line_before_loading_a_model(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "问", "chosen": "甲", "rejected": "乙"}, BAD_PAIRS[0][0]])
    out = tmp_path / "out"
    proc = run_medlora("finetune", "--stage", "dpo", "--base_model", tiny_model, "--data_path", str(data),
                       "--output_dir", str(out), "--max_steps", "1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("[medlora] ")]  # progress notes aside
    assert errors == [f"medlora finetune: error: {data}: {BAD_PAIRS[0][1]}"], proc.stderr
    assert not out.exists() or not any(out.iterdir())


def _margins(base_model: str, adapter: Path, pairs: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under an adapter, summed over the answer tokens (EOS included),
    with the prompt rendered as training renders it."""
    from medlora.generate import Generator
    from medlora.tokenize import tokenize_pairs

    generator = Generator.load(base_model, str(adapter), dtype="fp32", merge=True)
    records = [{"instruction": p["instruction"], "input": p["input"], "output": p["chosen"], "rejected": p["rejected"]}
               for p in pairs]
    examples, _ = tokenize_pairs(records, generator.template, generator.tokenizer, 256)

    def logp(prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = generator.model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        return logits[len(prompt) - 1:].gather(-1, targets[len(prompt) - 1:, None]).sum().item()

    return [logp(e["prompt_ids"], e["chosen_ids"]) - logp(e["prompt_ids"], e["rejected_ids"]) for e in examples]


def _sha(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("adapter_model.safetensors")))).hexdigest()


def test_dpo_on_an_sft_adapter_raises_the_chosen_margin_against_a_frozen_copy(tiny_model, tiny_adapter, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out, before = tmp_path / "dpo", _sha(tiny_adapter)
    from medlora.cli import main

    assert main(["finetune", "--stage", "dpo", "--lora_weights", str(tiny_adapter), "--base_model", tiny_model,
                 "--data_path", str(data), "--output_dir", str(out), "--max_steps", "6", "--beta", "0.5",
                 *LEARN_FLAGS, "--learning_rate", "5e-3", "--logging_steps", "1"]) == 0
    assert _sha(tiny_adapter) == before  # the starting adapter is read, never written
    meta = json.loads((out / "medlora.json").read_text())
    assert meta["preference"]["stage"] == "dpo" and meta["template"]["name"] == "med_template"
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    margins_logged = [row["rewards/margins"] for row in log if "rewards/margins" in row]
    assert losses[-1] < losses[0] and margins_logged[-1] > margins_logged[0], log
    start, tuned = _margins(tiny_model, tiny_adapter, PAIRS), _margins(tiny_model, out, PAIRS)
    assert sum(tuned) / len(tuned) > sum(start) / len(start) + 0.5, (start, tuned)
    # the saved adapter is one plain adapter (TRL's frozen `ref` copy is not saved) that infer can load
    assert not (out / "ref").exists() and (out / "adapter_model.safetensors").is_file()


def test_kto_turns_each_pair_into_a_desirable_and_an_undesirable_answer(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "kto"
    proc = run_medlora("finetune", "--stage", "kto", "--base_model", tiny_model, "--data_path", str(data),
                       "--output_dir", str(out), "--max_steps", "2", "--knowledge", "kb", *LEARN_FLAGS)
    assert "8 pairs for kto" in proc.stdout and (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "medlora.json").read_text())
    assert meta["preference"]["stage"] == "kto" and meta["preference"]["reference"] == "the base model"
    # with knowledge, the prompts carry the facts and the adapter records where from (as SFT adapters do)
    assert meta["knowledge"]["source"] == "kb" and meta["template"]["name"] == "med_knowledge"


# --- pairs judged by the knowledge base (medlora data pairs, medlora.pairs) ------------------------------------------

def test_the_judges_rank_answers_the_way_a_reader_would():
    from medlora.pairs import judge

    facts = {"kind": "facts", "instruction": "2型糖尿病有哪些典型症状？", "input": "", "disease": "2型糖尿病",
             "attribute": "symptoms", "pattern": "symptom"}
    right = judge({**facts, "output": "常见多饮、多尿、多食、体重下降。"})
    invented = judge({**facts, "output": "常见咯血、皮疹、关节肿痛。"})
    looping = judge({**facts, "output": "多饮、多饮、多饮、多饮、多饮、多饮", "ended_by_eos": False})
    urgent = judge({**facts, "output": "立即拨打120。常见多饮、多尿、多食、体重下降。"})
    assert right["total"] > urgent["total"] > invented["total"] and right["total"] > looping["total"]
    assert looping["loop"] and not right["loop"]
    emergency = {"kind": "emergency", "pattern": "emergency", "instruction": "胸口压着疼半小时，出冷汗", "input": ""}
    assert judge({**emergency, "output": "立即拨打120。"})["total"] > judge({**emergency, "output": "多喝热水，在家观察即可。"})["total"]
    calm = {"kind": "calm", "pattern": "routine", "instruction": "脸上长痘怎么护理？", "input": ""}
    assert judge({**calm, "output": "注意清洁，少吃辛辣。"})["total"] > judge({**calm, "output": "立即去医院急诊。"})["total"]
    unknown = {"kind": "unknown", "pattern": "unknown", "instruction": "登革热有哪些症状？", "input": ""}
    assert judge({**unknown, "output": "关于登革热，我没有可靠的资料，建议咨询医生。"})["total"] > \
        judge({**unknown, "output": "登革热的症状有发热、咳嗽、腹泻、皮疹。"})["total"]


def test_pairs_come_from_training_questions_and_rebuild_byte_identical(tiny_model, tiny_adapter, tmp_path):
    from medlora.cli import main

    files = []
    for name in ("a", "b"):
        out = tmp_path / name / "pairs.jsonl"
        assert main(["data", "pairs", "--lora_weights", str(tiny_adapter), "--base_model", tiny_model, "--out", str(out),
                     "--per_kind", "2", "--samples", "2", "--max_new_tokens", "6", "--margin", "0.5"]) == 0
        files.append(out)
    assert files[0].read_bytes() == files[1].read_bytes()
    pairs = load_records(files[0], pairs=True)
    assert pairs and all(set(p["scores"]) == {"chosen", "rejected", "chosen_is_golden"} for p in pairs)
    assert all(p["scores"]["chosen"]["total"] - p["scores"]["rejected"]["total"] >= 0.5 for p in pairs)
    # every prompt is a question of the committed training split (so the exam's and the real set's near-copy test
    # against that split covers the pairs too)
    train = {json.loads(line)["instruction"] for line in (Path(__file__).parents[1] / "data/medqa/train.jsonl")
             .read_text(encoding="utf-8").splitlines()}
    from medlora.pairs import prompts

    assert all(p["instruction"] in train for p in prompts(24))


def test_an_adapter_carries_its_recommended_decoding_and_flags_override_it(tiny_adapter):
    """finetune saves the recommended decoding as generation_config.json; infer, eval, chat and webui start from it."""
    from medlora.cli import build_parser
    from medlora.commands._common import generation_args
    from medlora.config import RECOMMENDED_DECODING

    assert json.loads((tiny_adapter / "generation_config.json").read_text()) == RECOMMENDED_DECODING
    parser = build_parser(only="infer")
    plain = parser.parse_args(["infer", "--lora_weights", str(tiny_adapter)])
    gen = generation_args(plain, str(tiny_adapter))
    assert (gen.max_new_tokens, gen.frequency_penalty, gen.do_sample) == (128, 0.3, False)
    flagged = parser.parse_args(["infer", "--lora_weights", str(tiny_adapter), "--frequency_penalty", "0",
                                 "--max_new_tokens", "32"])
    gen = generation_args(flagged, str(tiny_adapter))
    assert (gen.max_new_tokens, gen.frequency_penalty) == (32, 0.0)
    assert generation_args(plain).frequency_penalty == 0.0  # no adapter: GenerationArgs' own defaults


def test_prompt_counts_per_kind_and_unknown_kinds_refused(capsys):
    from medlora.cli import main
    from medlora.pairs import KINDS, prompts

    rows = prompts(2, counts={"emergency": 5, "unknown": 0})
    assert {kind: sum(r["kind"] == kind for r in rows) for kind in KINDS} == \
        {"facts": 2, "missing": 2, "emergency": 5, "unknown": 0, "calm": 2}
    assert main(["data", "pairs", "--lora_weights", "nowhere", "--counts", "rare=3"]) == 2
    assert "unknown kind 'rare'" in capsys.readouterr().err.strip().splitlines()[-1]
