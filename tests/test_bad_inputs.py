"""Bad input a user really hands in: each gets one clear line naming the file, line and field (or the adapter and
the reason), through the library and through the CLI (exit code 2, no traceback), before any weights are loaded.

Data files live in tests/data/bad/ (small, written for these tests); broken adapters are made from a quick one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medlora.data import iter_records, load_records
from medlora.errors import DataError
from tests.conftest import free_port
from tests.test_atomic_outputs import lora_on_tiny_qwen2, save_quick_adapter

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad"
ICONV = "convert it with: iconv -f GB18030 -t UTF-8"

# file → the message after "{path}: "
MESSAGES = {
    "gbk.jsonl": f"line 1: not valid UTF-8 (it looks GBK/GB18030-encoded); {ICONV} '{BAD}/gbk.jsonl' > "
                 f"'{BAD}/gbk.utf8.jsonl'",
    "gb18030.csv": f"line 2: not valid UTF-8 (it looks GBK/GB18030-encoded); {ICONV} '{BAD}/gb18030.csv' > "
                   f"'{BAD}/gb18030.utf8.csv'",
    "trailing_comma.json": "line 3: invalid JSON (trailing comma at column 64; JSON allows none before ']')",
    "mixed.json": "line 2: invalid JSON (Extra data at column 1: a second JSON value after the first; use one JSON "
                  "array, or one JSON object per line)",
    "null_output.jsonl": "line 2: field 'output' is null",
    "empty.jsonl": "the file is empty (0 bytes)",
    "no_data": "no data files (.json, .jsonl, .csv, .parquet) in this folder",
    "unquoted_comma.csv": "line 2: 3 values for 2 columns (instruction, output); quote values that contain commas or "
                          "line breaks",
    "truncated.jsonl": "line 2: not valid UTF-8 (a broken character in UTF-8 text: the file is damaged or was cut "
                       "off there)",
    "pretty_object.jsonl": "line 1: invalid JSON (Expecting property name enclosed in double quotes at column 2: a "
                           "record spread over several lines; JSONL needs one whole object per line (or write one "
                           "JSON array))",
    "list_output.jsonl": "line 1: field 'output' must be a string, got list",
    "lone_surrogate.jsonl": "line 1: field 'instruction': unpaired surrogate '\\ud83d' at character 3 (a broken \\u "
                            "escape; not valid text)",
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_each_bad_file_gets_its_exact_message(name):
    with pytest.raises(DataError) as caught:
        load_records(BAD / name)
    assert str(caught.value) == f"{BAD / name}: {MESSAGES[name]}"


def test_excel_csv_with_bom_crlf_and_chinese_headers_loads_through_columns():
    records = load_records(BAD / "excel_export.csv", columns="instruction=问题,output=回答")
    assert records == [
        {"instruction": "感冒的常见症状是什么？", "input": "", "output": "鼻塞、流涕,咽痛。\r\n多休息。"},
        {"instruction": "高血压应该去哪个科室？", "input": "", "output": "心内科。"},
    ]
    with pytest.raises(DataError, match=r"excel_export.csv: line 2: field 'instruction' is missing"):
        load_records(BAD / "excel_export.csv")  # without --columns the Chinese headers map to nothing


def test_a_mapped_column_must_exist_and_wins_over_a_field_of_the_same_name(tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_text('{"问题": "头痛怎么办？", "instruction": "旧的", "output": "休息。"}\n{"instruction": "b", "output": "c"}\n')
    with pytest.raises(DataError, match=f"^{path}: line 2: column '问题' is missing \\(--columns instruction=问题\\)$"):
        load_records(path, columns="instruction=问题")  # it silently trained on the unmapped 'instruction' before
    first = next(iter_records(path, columns="instruction=问题"))
    assert first == {"instruction": "头痛怎么办？", "input": "", "output": "休息。"}


def test_deeply_nested_and_huge_number_json_are_data_errors(tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "digits.jsonl").write_text('{"instruction": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl: line 1: invalid JSON \(nested too deeply to read\)"):
        load_records(tmp_path / "deep.jsonl")
    with pytest.raises(DataError, match=r"digits.jsonl: line 1: invalid JSON \(Exceeds the limit"):
        load_records(tmp_path / "digits.jsonl")


def test_an_unreadable_file_is_a_data_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "secret.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    path.chmod(0)
    with pytest.raises(DataError, match="secret.jsonl: cannot read the file"):
        load_records(path)


# --- broken adapters ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A good adapter and broken copies of it, plus adapters trained on another (narrower) Qwen2 base."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medlora.modeling import attach_lora, model_fingerprint
    from medlora.train import save_adapter

    root = tmp_path_factory.mktemp("adapters")
    model, tokenizer = lora_on_tiny_qwen2()
    good = save_quick_adapter(model, tokenizer, root / "good", seed=1)
    made = {"good": good}
    for name in ("no_config", "pickle_only", "truncated", "list_config", "bad_json_config"):
        made[name] = Path(shutil.copytree(good, root / name))
    (made["no_config"] / "adapter_config.json").unlink()
    (made["list_config"] / "adapter_config.json").write_text("[1, 2]")
    (made["bad_json_config"] / "adapter_config.json").write_text('{"r": 8,}')
    weights = made["pickle_only"] / "adapter_model.safetensors"
    torch.save(load_file(weights), made["pickle_only"] / "adapter_model.bin")
    weights.unlink()
    weights = made["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    other = attach_lora(Qwen2ForCausalLM(config), r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    made["other_base"] = save_adapter(other, tokenizer, root / "other_base",
                                      {"base_model": "tiny-qwen2-h32", "base_fingerprint": model_fingerprint(config)})
    made["foreign"] = Path(shutil.copytree(made["other_base"], root / "foreign"))  # no medlora.json: PEFT's own
    (made["foreign"] / "medlora.json").unlink()
    config_file = made["foreign"] / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": "some-org/narrow-qwen2"}))
    return made


# Runs `medlora.cli.main` once per case in one fresh process (one torch import for all), capturing what reaches
# file descriptor 2 and counting AutoModelForCausalLM.from_pretrained calls (weights loaded before the error).
CLI_DRIVER = r"""
import json, os, sys, tempfile, time, traceback
import transformers
cases, loads = json.load(open(sys.argv[1])), []
original = transformers.AutoModelForCausalLM.from_pretrained
def counting(*args, **kwargs):
    loads.append(1)
    return original(*args, **kwargs)
transformers.AutoModelForCausalLM.from_pretrained = counting
from medlora.cli import main
from medlora.modeling import resolve_model_path
resolve_model_path("tiny-qwen2")  # its once-per-process "random weights" notice is not part of any case
results = []
for argv in cases:
    loads.clear()
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        crash, started = None, time.perf_counter()
        try:
            code = main(argv)
        except BaseException as exc:
            code, crash = getattr(exc, "code", None), traceback.format_exc()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results.append({"code": code, "stderr": err.read().decode("utf-8", "replace"), "crash": crash,
                        "weights_loaded": len(loads), "seconds": round(time.perf_counter() - started, 2)})
json.dump(results, open(sys.argv[2], "w"))
"""


def run_cli_cases(cases: list[list[str]], tmp_path: Path) -> list[dict]:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", CLI_DRIVER, str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


@pytest.fixture(scope="module")
def cli_results(adapters, tiny_model, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("cli")
    (work / "empty_model").mkdir()
    from medlora.modeling import resolve_model_path

    shutil.copytree(resolve_model_path(tiny_model), work / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    good_data, a_file = work / "good.jsonl", work / "a_file"
    a_file.write_text("not a folder\n")
    good_data.write_text(json.dumps({"instruction": "感冒怎么办？", "output": "多休息。"}, ensure_ascii=False) + "\n")
    base = ["--base_model", "tiny-qwen2"]
    train = ["finetune", *base, "--output_dir", str(work / "run"), "--max_steps", "1", "--dtype", "fp32"]
    infer = ["infer", *base, "--instruct_dir", str(good_data), "--max_new_tokens", "2", "--dtype", "fp32"]
    cases = {f"data:{name}": [*train, "--data_path", str(BAD / name)] for name in MESSAGES}
    cases.update({
        "cutoff_len": [*train, "--data_path", str(good_data), "--cutoff_len", "4096"],
        "target_module": [*train, "--data_path", str(good_data), "--lora_target_modules", "q_proj,qkv_proj"],
        **{f"infer:{name}": [*infer, "--lora_weights", str(adapters[name])]
           for name in ("no_config", "pickle_only", "truncated", "other_base", "foreign", "list_config",
                        "bad_json_config")},
        "merge:list_config": ["merge", *base, "--lora_weights", str(adapters["list_config"]), "--out", str(work / "m")],
        "infer:pickle_allowed": [*infer, "--lora_weights", str(adapters["pickle_only"]), "--allow_pickle"],
        "merge:truncated": ["merge", *base, "--lora_weights", str(adapters["truncated"]), "--out", str(work / "m")],
        "serve:no_config": ["serve", *base, "--lora_weights", f"x={adapters['no_config']}", "--port", str(free_port())],
        "eval:other_base": ["eval", *base, "--lora_weights", str(adapters["other_base"]), "--data", str(good_data),
                            "--out", str(work / "ev")],
        # settings out of range, and output folders that are files
        **{f"finetune:{' '.join(flags)}": [*train, "--data_path", str(good_data), *flags] for flags in BAD_SETTINGS},
        "finetune:epochs": ["finetune", *base, "--data_path", str(good_data), "--output_dir", str(work / "run"),
                            "--num_epochs", "0"],
        "finetune:out": [*train, "--data_path", str(good_data), "--output_dir", str(a_file)],
        "infer:out": [*infer, "--model_output_dir", str(a_file)],
        "eval:out": ["eval", *base, "--data", str(good_data), "--out", str(a_file)],
        "data:out": ["data", "build", "--out", str(a_file)],
        # output folders where nothing can be written: under a file, under /proc
        "finetune:under_file": [*train, "--data_path", str(good_data), "--output_dir", str(a_file / "run")],
        "infer:proc": [*infer, "--model_output_dir", "/proc/medlora-results"],
        "eval:proc": ["eval", *base, "--data", str(good_data), "--out", "/proc/medlora-eval"],
        "merge:under_file": ["merge", *base, "--lora_weights", str(adapters["truncated"]), "--out",
                             str(a_file / "merged")],
        "model:empty": ["infer", "--base_model", str(work / "empty_model"), "--instruct_dir", str(good_data)],
        "model:no_tokenizer": ["infer", "--base_model", str(work / "no_tokenizer"), "--instruct_dir", str(good_data)],
    })
    results = run_cli_cases(list(cases.values()), work)
    return {name: {**result, "argv": argv} for (name, argv), result in zip(cases.items(), results)}


BAD_SETTINGS = {  # finetune flags → the message (a traceback from torch or PEFT before, or a silent no-op)
    ("--learning_rate", "-1"): "--learning_rate must be above 0",
    ("--learning_rate", "nan"): "--learning_rate must be above 0",
    ("--lora_r", "0"): "--lora_r and --lora_alpha must be at least 1",
    ("--lora_dropout", "1"): "--lora_dropout must be from 0 up to (not including) 1",
    ("--cutoff_len", "1"): "--cutoff_len must be at least 2 (a prompt token and an answer token)",
    ("--loraplus_lr_ratio", "0.5"): "--loraplus_lr_ratio must be 0 (off) or at least 1",
    ("--micro_batch_size", "0"): "--micro_batch_size must be at least 1",
    ("--save_steps", "0"): "--save_steps must be at least 1",
    ("--lora_target_modules", ""): "--lora_target_modules is empty: name the modules (e.g. q_proj,v_proj) or use "
                                   "all-linear",
    ("--warmup_steps", "inf"): "--warmup_steps and --weight_decay must be 0 or more (and finite)",
    ("--seed", "-1"): "--seed must be from 0 to 4294967295",
    ("--lora_r", "100000000"): "--lora_r 100000000 exceeds the size of the target layers: at most 64 for this model",
    ("--report_to", "bogus"): "--report_to bogus: use auto, none, all or any of azure_ml, comet_ml, mlflow, neptune, "
                              "tensorboard, trackio, wandb, codecarbon, clearml, dagshub, flyte, dvclive, swanlab, "
                              "kubeflow",
}


def assert_one_line_error(result: dict, line: str, weights_loaded: int = 0, prefix: bool = False) -> None:
    """`line` is the whole error line, or with `prefix` its beginning (the rest is the system's reason)."""
    assert result["crash"] is None, result["crash"]
    assert result["code"] == 2, result
    assert "Traceback" not in result["stderr"]
    lines = result["stderr"].splitlines()
    # the error is the one line that is not a "[medlora] ..." progress note (e.g. the CPU-threads notice), and the last
    errors = [x for x in lines if not x.startswith("[medlora] ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result["stderr"]
    assert (lines[-1].startswith(line) and len(lines[-1]) <= 300) if prefix else lines[-1] == line, result["stderr"]
    assert result["weights_loaded"] == weights_loaded, "weights were loaded before the error"


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_finetune_on_a_bad_file_exits_2_with_one_line(cli_results, name):
    assert_one_line_error(cli_results[f"data:{name}"], f"medlora finetune: error: {BAD / name}: {MESSAGES[name]}")


def test_cutoff_len_over_the_context_and_a_missing_target_module_fail_before_loading(cli_results):
    assert_one_line_error(cli_results["cutoff_len"],
                          "medlora finetune: error: --cutoff_len 4096 exceeds the model's context of 2048 tokens")
    assert_one_line_error(cli_results["target_module"],
                          "medlora finetune: error: --lora_target_modules: qkv_proj not found in this model; its "
                          "linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj "
                          "(or use all-linear)")


def test_broken_adapters_are_refused_with_the_reason_before_loading_the_base(cli_results, adapters):
    assert_one_line_error(cli_results["infer:no_config"], f"medlora infer: error: {adapters['no_config']}: missing "
                          f"adapter_config.json (not a finished LoRA adapter folder)")
    assert_one_line_error(cli_results["infer:pickle_only"], f"medlora infer: error: {adapters['pickle_only']}: only "
                          f"a pickled adapter_model.bin is present; pickle files can run arbitrary code when loaded. "
                          f"Pass --allow_pickle if you trust its source")
    weights = adapters["truncated"] / "adapter_model.safetensors"
    truncated = cli_results["infer:truncated"]["stderr"]
    assert truncated.startswith(f"medlora infer: error: {weights}: not a readable safetensors file (")
    assert_one_line_error(cli_results["infer:truncated"], truncated.rstrip("\n"))
    assert truncated.rstrip().endswith("; it may be truncated")
    assert_one_line_error(cli_results["merge:truncated"],
                          truncated.rstrip("\n").replace("medlora infer", "medlora merge"))
    assert_one_line_error(cli_results["serve:no_config"], f"medlora serve: error: {adapters['no_config']}: missing "
                          f"adapter_config.json (not a finished LoRA adapter folder)")
    config = adapters["list_config"] / "adapter_config.json"
    for command in ("infer", "merge"):
        assert_one_line_error(cli_results[f"{command}:list_config"], f"medlora {command}: error: {config}: must be a "
                              f"JSON object (PEFT's LoRA settings), got list")
    config = adapters["bad_json_config"] / "adapter_config.json"
    assert_one_line_error(cli_results["infer:bad_json_config"], f"medlora infer: error: {config}: not valid JSON "
                          f"(Expecting property name enclosed in double quotes)")


def test_pickle_adapter_loads_when_allowed(cli_results):
    result = cli_results["infer:pickle_allowed"]
    assert result["crash"] is None and result["code"] == 0, result


def test_an_adapter_trained_on_another_base_is_refused_naming_both(cli_results, adapters):
    message = (f"{adapters['other_base']}: this adapter was trained on base model 'tiny-qwen2-h32', which differs "
               f"from the one loaded (hidden_size: 32 vs 64, intermediate_size: 64 vs 128); pass the matching "
               f"--base_model")
    assert_one_line_error(cli_results["infer:other_base"], f"medlora infer: error: {message}")
    assert_one_line_error(cli_results["eval:other_base"], f"medlora eval: error: {message}")
    # Without medlora.json only PEFT's load can tell: after the base is loaded, still one line and exit 2.
    foreign = cli_results["infer:foreign"]
    assert foreign["code"] == 2 and foreign["crash"] is None and "Traceback" not in foreign["stderr"]
    assert (f"[medlora] {adapters['foreign']}: adapter_config.json names base model 'some-org/narrow-qwen2', not "
            f"'tiny-qwen2' as given; check --base_model") in foreign["stderr"].splitlines()
    assert foreign["stderr"].splitlines()[-1] == (
        f"medlora infer: error: {adapters['foreign']}: this adapter does not fit the base model: size mismatch for "
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight: copying a param with shape "
        f"torch.Size([4, 32]) from checkpoint, the shape in current model is torch.Size([4, 64]).")


@pytest.mark.parametrize("flags", sorted(BAD_SETTINGS), ids=" ".join)
def test_settings_out_of_range_are_refused_before_loading(cli_results, flags):
    assert_one_line_error(cli_results[f"finetune:{' '.join(flags)}"], f"medlora finetune: error: {BAD_SETTINGS[flags]}")


def test_zero_epochs_is_refused_not_an_untrained_adapter_saved(cli_results):
    assert_one_line_error(cli_results["finetune:epochs"],
                          "medlora finetune: error: --num_epochs must be above 0 (or give --max_steps)")


@pytest.mark.parametrize("case, flag", [("finetune:out", "--output_dir"), ("infer:out", "--model_output_dir"),
                                        ("eval:out", "--out"), ("data:out", "--out")])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(cli_results, case, flag):
    command = case.split(":")[0]
    a_file = next(arg for arg in cli_results[case]["argv"] if arg.endswith("a_file"))
    assert_one_line_error(cli_results[case], f"medlora {command}: error: {flag} {a_file}: exists and is not a folder")


@pytest.mark.parametrize("case, message", [
    ("finetune:under_file", "--output_dir {a_file}/run: {a_file} is a file, so no folder can be made under it"),
    ("infer:proc", "--model_output_dir /proc/medlora-results: cannot write in /proc"),
    ("eval:proc", "--out /proc/medlora-eval: cannot write in /proc"),
    ("merge:under_file", "--out {a_file}/merged: {a_file} is a file, so no folder can be made under it"),
])
def test_an_output_folder_where_nothing_can_be_written_is_refused_before_any_work(cli_results, case, message):
    a_file = next(Path(arg) for arg in cli_results["finetune:out"]["argv"] if arg.endswith("a_file"))
    result = cli_results[case]
    assert_one_line_error(result, f"medlora {case.split(':')[0]}: error: " + message.format(a_file=a_file),
                          prefix=True)


def test_counts_must_be_whole_numbers_of_at_least_one():
    from medlora.commands._common import port_number, positive_int

    assert positive_int("3") == 3 and port_number("8000") == 8000
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            positive_int(bad)
    for bad in ("0", "65536", "http"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 1 to 65535"):
            port_number(bad)


def test_a_model_folder_without_config_or_tokenizer_files_is_named_with_what_is_missing(cli_results):
    empty = next(arg for arg in cli_results["model:empty"]["argv"] if arg.endswith("empty_model"))
    assert_one_line_error(cli_results["model:empty"], f"medlora infer: error: cannot load model {empty!r}: no "
                          f"config.json in this folder (not a transformers model folder)")
    # transformers 5 builds a one-token tokenizer for a folder without tokenizer files; it answered gibberish
    no_tokenizer = cli_results["model:no_tokenizer"]
    folder = next(arg for arg in no_tokenizer["argv"] if arg.endswith("no_tokenizer"))
    line = no_tokenizer["stderr"].strip().splitlines()[-1]
    assert line.startswith(f"medlora infer: error: {folder}: the tokenizer has ")
    assert line.endswith("token(s): its files (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model) are "
                         "missing or unreadable; copy them from the base model")
    assert_one_line_error(no_tokenizer, line)


@pytest.mark.parametrize("module, command, extra", [
    ("gradio", ["webui", "--base_model", "tiny-qwen2", "--port", "1"], "web"),
    ("pyCMeKG", ["data", "build", "--source", "cmekg", "--out", "{tmp}/never-written"], "cmekg"),
])
def test_a_missing_optional_extra_gets_one_line_naming_it(monkeypatch, capsys, tmp_path, module, command, extra):
    """The extra's package cannot be imported (as on an install without it): one line, exit 2, no traceback."""
    import importlib.util

    from medlora.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "medlora.serve.webui", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == module else real_find_spec(name, *args))
    assert main([part.format(tmp=tmp_path) for part in command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"medlora {command[0]}: error: ") and f"pip install 'medlora[{extra}]'" in err[-1]
    assert not (tmp_path / "never-written").exists()


def test_fifos_symlink_loops_and_repeated_keys_get_their_own_message(tmp_path):
    fifo, loop = tmp_path / "pipe.jsonl", tmp_path / "loop.jsonl"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text('{"instruction": "问", "output": "答"}\n{"instruction": "问", "output": "答", "output": "另"}\n',
                        encoding="utf-8")
    array = tmp_path / "repeated.json"
    array.write_text('[{"instruction": "问", "instruction": "又问", "output": "答"}]', encoding="utf-8")
    for source, message in ((fifo, "not a regular file or folder (a FIFO, device or socket cannot be read as data)"),
                            (loop, "a symbolic link that leads nowhere (a loop, or its target is missing)"),
                            (repeated, "line 2: key 'output' appears twice in one record"),
                            (array, "key 'instruction' appears twice in one record")):
        with pytest.raises(DataError) as caught:
            load_records(str(source))
        assert str(caught.value) == f"{source}: {message}"


def test_hidden_files_in_a_data_folder_are_skipped_and_said(tmp_path, caplog):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "old.jsonl").write_text('{"instruction": "旧", "output": "旧"}\n', encoding="utf-8")
    (tmp_path / ".backup.jsonl").write_text('{"instruction": "备", "output": "备"}\n', encoding="utf-8")
    (tmp_path / "train.jsonl").write_text('{"instruction": "问", "output": "答"}\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        records = load_records(str(tmp_path))
    assert [r["instruction"] for r in records] == ["问"]
    assert "skipping 2 hidden file(s)" in caplog.text


def test_finetune_refuses_an_output_folder_that_holds_the_data_or_other_files(tmp_path, capsys):
    from medlora.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"instruction": "问", "output": "答"}\n', encoding="utf-8")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine\n")
    cases = [(data, f"--output_dir {data}: holds the training data (--data_path {data / 'train.jsonl'}); choose "
                    f"another folder"),
             (project, f"--output_dir {project}: a non-empty folder that is not a medlora output (it holds "
                       f"'notes.txt'); choose an empty or new folder")]
    for out, message in cases:
        assert main(["finetune", "--base_model", "tiny-qwen2", "--data_path", str(data / "train.jsonl"),
                     "--output_dir", str(out), "--max_steps", "1"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"medlora finetune: error: {message}"
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
