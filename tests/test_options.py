"""The option schema: each option declared once (PromptArgs, commands/_common), its old spellings and recipe keys
kept, and one rule (loader.resolve_prompt) for the template, knowledge and system text of every command."""

from __future__ import annotations

import json
import re

import pytest

from medlora.cli import COMMANDS, apply_recipe, build_parser
from medlora.commands._common import model_args, prompt_args
from medlora.config import DataArgs, ModelArgs, PromptArgs, model_and_prompt
from medlora.errors import ConfigError
from medlora.loader import resolve_prompt
from medlora.templates import load_template

RUNNING = ("infer", "eval", "bench", "chat", "serve", "webui")  # the commands that run a model with an adapter's prompts
# each command's output option and the namespace name it lands in (its recipe key)
OUT_DESTS = {"finetune": "output_dir", "infer": "model_output_dir", "eval": "out", "bench": "out", "merge": "out",
             "export": "out", ("data", "build"): "out", ("data", "chat"): "out", ("data", "pairs"): "out"}


def parse(*argv: str):
    """The namespace of a command line (required options are checked later, by apply_recipe)."""
    return build_parser(only=argv[0]).parse_args(list(argv))


def help_options(command: tuple[str, ...], capsys, monkeypatch) -> list[list[str]]:
    """The flags of each option `command --help` describes, as [[--out, --output_dir], ...]."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        build_parser(only=command[0]).parse_args([*command, "--help"])
    lines = capsys.readouterr().out.splitlines()
    heads = [line[2:].split("  ")[0] for line in lines if line.startswith("  -")]
    return [re.findall(r"(?:^|, )(--?[\w-]+)", head) for head in heads]


@pytest.mark.parametrize("command", [*RUNNING, "finetune", "export"])
@pytest.mark.parametrize("flag", ["--prompt_template", "--template", "--prompt_template_name"])
def test_every_spelling_of_the_template_option_lands_in_prompt_template(command, flag):
    args = parse(command, flag, "alpaca")
    assert args.prompt_template == "alpaca"
    if command != "finetune":
        assert prompt_args(args).prompt_template == "alpaca"


@pytest.mark.parametrize("command", RUNNING)
def test_the_running_commands_leave_the_prompt_to_the_adapter_unless_told(command):
    assert prompt_args(parse(command)) == PromptArgs(None, None, None)
    given = prompt_args(parse(command, "--knowledge", "none", "--system", "", "--template", "chat"))
    assert given == PromptArgs("chat", "none", "")  # --system "" is given: it drops the adapter's system text


def test_finetune_keeps_its_own_defaults_for_the_same_options():
    from medlora.commands.finetune import build_options, resolve_options

    _, data, *_ = build_options(resolve_options(parse("finetune")))
    assert (data.prompt_template, data.knowledge, data.system) == ("", "none", "")
    _, data, *_ = build_options(resolve_options(parse("finetune", "--template", "alpaca", "--knowledge", "kb",
                                                      "--system", "你是医生。")))
    assert (data.prompt_template, data.knowledge, data.system) == ("alpaca", "kb", "你是医生。")


def test_data_args_declares_prompt_args_options_once():
    """The same flag, aliases, help and metavar: only the default (and the words for it) differ."""
    for name, spec in PromptArgs.__dataclass_fields__.items():
        mine = DataArgs.__dataclass_fields__[name].metadata
        assert {k: v for k, v in mine.items() if k != "default_help"} == \
               {k: v for k, v in spec.metadata.items() if k != "default_help"}, name


@pytest.mark.parametrize("command, dest", OUT_DESTS.items(), ids=str)
def test_every_output_option_takes_out_and_output_dir(command, dest):
    command = command if isinstance(command, tuple) else (command,)
    for flag in ("--out", "--output_dir", *(["--model_output_dir"] if dest == "model_output_dir" else [])):
        assert getattr(parse(*command, flag, "somewhere"), dest) == "somewhere", flag


@pytest.mark.parametrize("command", [*COMMANDS.keys() - {"data", "models"}, "data build", "data chat", "data pairs"])
def test_each_command_lists_each_shared_option_once_in_its_help(command, capsys, monkeypatch):
    options = help_options(tuple(command.split()), capsys, monkeypatch)
    assert options and all(options), options
    for flag in ("--out", "--output_dir", "--lora_weights", "--prompt_template", "--template", "--knowledge",
                 "--system", "--base_model", "--trust_remote_code"):
        assert sum(flag in flags for flags in options) <= 1, (command, flag)
    if command not in ("chat", "serve", "webui"):
        out = [flags for flags in options if "--out" in flags]
        assert len(out) == 1 and "--output_dir" in out[0], (command, out)


def test_lora_weights_has_two_shapes_one_adapter_or_many_named():
    for command in ("infer", "chat", "webui", "merge", "export"):
        assert parse(command, "--lora_weights", "a").lora_weights == "a"
    for command in ("eval", "bench", "serve"):
        assert parse(command, "--lora_weights", "a", "--lora_weights", "b=c").lora_weights == ["a", "b=c"]
    assert parse("data", "pairs", "--lora_weights", "a").lora_weights == "a"
    assert parse("infer", "--lora_weights", "a", "--use_lora").use_lora is True


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_read_the_model_options_of_the_other_commands(command):
    required = ["--lora_weights", "a", "--out", "o.gguf"]
    plain = model_args(parse(command, "--base_model", "b", *required))
    assert (plain.base_model, plain.trust_remote_code, plain.allow_pickle) == ("b", False, False)
    for flags in (["--trust_remote_code", "--allow_pickle"], ["--trust_remote_code", "true", "--allow_pickle", "yes"]):
        margs = model_args(parse(command, "--base_model", "b", *required, *flags))
        assert margs.trust_remote_code and margs.allow_pickle, flags
    if command == "merge":  # merge's own default and choices stay
        assert model_args(parse(command, "--base_model", "b", *required)).dtype == "fp32"
        assert model_args(parse(command, "--base_model", "b", *required, "--torch_dtype", "bf16")).dtype == "bf16"
        with pytest.raises(SystemExit):
            parse(command, "--base_model", "b", *required, "--dtype", "fp16")
    else:  # export's base may be a merged folder: no default base model
        assert model_args(parse(command, *required)).base_model is None


def recipe_parse(*argv: str):
    parser = build_parser(only=argv[0])
    return apply_recipe(parser, parser.parse_args(list(argv)), list(argv))


def test_recipe_keys_of_the_shared_options_still_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt_template: alpaca\nknowledge: kb\nsystem: 你是医生。\nmodel_output_dir: o\n"
                      "lora_weights: a\ntrust_remote_code: true\n", encoding="utf-8")
    args = recipe_parse("infer", "--config", str(recipe))
    assert prompt_args(args) == PromptArgs("alpaca", "kb", "你是医生。")
    assert (args.model_output_dir, args.lora_weights, model_args(args).trust_remote_code) == ("o", "a", True)
    recipe.write_text("base_model: b\nlora_weights: a\nout: m\nallow_pickle: true\n", encoding="utf-8")
    args = recipe_parse("merge", "--config", str(recipe))
    assert (args.out, model_args(args).allow_pickle) == ("m", True)
    recipe.write_text("lora_weights: [a, b=c]\nout: e\ntemplate: alpaca\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown option 'template'"):  # a recipe key is the option's main name
        recipe_parse("eval", "--config", str(recipe))


def test_the_old_keyword_form_of_the_loaders_is_read_into_the_dataclasses():
    margs, prompt, others = model_and_prompt("m", None, {"dtype": "fp32", "knowledge": "none", "max_queue": 3})
    assert (margs, prompt, others) == (ModelArgs("m", "fp32"), PromptArgs(knowledge="none"), {"max_queue": 3})
    margs, prompt, _ = model_and_prompt(ModelArgs("m", "bf16"), PromptArgs("alpaca"), {"system": ""})
    assert (margs, prompt) == (ModelArgs("m", "bf16"), PromptArgs("alpaca", None, ""))
    with pytest.raises(TypeError):
        model_and_prompt("m", "alpaca", {})  # the old third positional (a template name) is refused, not misread


def test_generator_load_refuses_an_unknown_keyword_before_loading_anything():
    from medlora.generate import Generator

    with pytest.raises(TypeError, match="prompt_tempalte"):
        Generator.load("no-such-model", prompt_tempalte="alpaca")


def _adapter_record(tmp_path, **fields):
    record = {"base_model": "tiny-qwen2", "template": load_template("alpaca").to_dict(), "system": "你是医生。",
              "knowledge": {"source": "kb", "sha256": None}, **fields}
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "medlora.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.mark.parametrize("prompt_template, knowledge, system, expected", [
    ("", "none", "", ("med_template", False, "")),
    ("", "kb", "", ("med_knowledge", True, "")),
    ("alpaca", "kb", "你是医生。", ("alpaca", True, "你是医生。")),
])
def test_training_and_the_running_commands_share_one_default_template_rule(prompt_template, knowledge, system,
                                                                           expected):
    """finetune's options (no adapter to defer to) resolve as a running command's do for a base model."""
    data = DataArgs(prompt_template=prompt_template, knowledge=knowledge, system=system)
    template, index = resolve_prompt(data.prompt())
    assert (template.name, index is not None, template.system) == expected
    running, _ = resolve_prompt(PromptArgs(prompt_template or None, knowledge, system))
    assert (running.name, running.system) == (template.name, template.system)


def test_what_the_options_leave_open_comes_from_the_adapter_record(tmp_path):
    folder = _adapter_record(tmp_path)
    template, index = resolve_prompt(PromptArgs(), folder)
    assert (template.name, template.system, index is not None) == ("alpaca", "你是医生。", True)
    template, index = resolve_prompt(PromptArgs("chat", "none", ""), folder)
    assert (template.name, template.system, index) == ("chat", "", None)
    # finetune's defaults (a preference stage from this adapter) leave all three open
    template, index = resolve_prompt(DataArgs().prompt(), folder)
    assert (template.name, template.system, index is not None) == ("alpaca", "你是医生。", True)
    # no template recorded: the default rule, by the knowledge in use
    bare = _adapter_record(tmp_path, template=None)
    assert resolve_prompt(PromptArgs(), bare)[0].name == "med_knowledge"
    assert resolve_prompt(PromptArgs(knowledge="none"), bare)[0].name == "med_template"
