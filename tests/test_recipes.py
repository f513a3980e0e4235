"""Recipes: `--config recipe.yaml` with defaults < recipe < flags, unknown keys named, shipped recipes valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medlora.cli import apply_recipe, build_parser, main
from medlora.commands.finetune import build_options, load_recipe, resolve_options
from medlora.config import DataArgs, LoraArgs, ModelArgs, TrainArgs
from medlora.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def options(*argv: str):
    parser = build_parser(only="finetune")
    args = apply_recipe(parser, parser.parse_args(["finetune", *argv]), ["finetune", *argv])
    return build_options(resolve_options(args))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_recipes_are_the_expected_ones():
    names = {p.name for p in RECIPES}
    assert {"tiny-qwen2.yaml", "gemma3-270m-demo.yaml", "gemma3-270m-full.yaml", "qwen2-0.5b-gpu.yaml",
            "qwen1.5-0.5b-gpu.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_validates(recipe):
    values = load_recipe(str(recipe))
    model, data, lora, train, pref = build_options(values)
    assert isinstance(train.learning_rate, float) and 0 < train.learning_rate < 1
    assert train.batch_size % train.micro_batch_size == 0
    assert train.max_steps > 0 or train.num_epochs > 0
    assert train.output_dir.startswith("runs/")
    assert data.data_path in ("data/medqa/train.jsonl", "data/medchat/train.jsonl") if pref.stage == "sft" else \
        data.data_path.endswith("/pairs.jsonl") and pref.lora_weights.startswith("runs/")
    assert lora.lora_r > 0 and lora.lora_alpha > 0
    # through the command line too, as `medlora finetune --config RECIPE` reads it
    assert options("--config", str(recipe)) == (model, data, lora, train, pref)


def test_demo_and_gpu_recipes_carry_their_settings():
    demo = build_options(load_recipe(str(REPO / "recipes/gemma3-270m-demo.yaml")))
    assert (demo[0].base_model, demo[3].output_dir) == ("gemma3-270m", "runs/demo/adapter")
    assert build_options(load_recipe(str(REPO / "recipes/gemma3-270m-full.yaml")))[3].output_dir == "runs/full/adapter"
    for name, base in (("qwen2-0.5b-gpu", "Qwen/Qwen2-0.5B"), ("qwen1.5-0.5b-gpu", "Qwen/Qwen1.5-0.5B")):
        model, data, lora, train, _ = build_options(load_recipe(str(REPO / f"recipes/{name}.yaml")))
        assert (model.base_model, model.dtype) == (base, "bf16")
        assert (train.batch_size, train.num_epochs, train.learning_rate, data.cutoff_len) == (128, 3.0, 3e-4, 256)
        assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules) == (8, 16, 0.05, "q_proj,v_proj")


def test_defaults_then_recipe_then_flags(tmp_path):
    recipe = write(tmp_path, "lora_r: 32\nlearning_rate: 1.0e-3\nnum_epochs: 2\ngroup_by_length: false\n")
    model, data, lora, train, _ = options("--config", str(recipe), "--learning_rate", "5e-4", "--group_by_length")
    assert train.learning_rate == 5e-4  # flag over recipe
    assert train.group_by_length is True  # bare boolean flag over recipe's false
    assert lora.lora_r == 32 and train.num_epochs == 2.0  # recipe over defaults
    assert lora.lora_alpha == LoraArgs().lora_alpha and model == ModelArgs() and data == DataArgs()  # defaults
    assert options()[3] == TrainArgs()


def test_the_huatuo_and_alpaca_lora_scripts_flags_are_accepted(monkeypatch, tmp_path):
    """Huatuo's scripts/finetune.sh passes --prompt_template_name and --wandb_run_name; alpaca-lora's README writes
    target modules as a python-fire list. Both were refused ('unrecognized arguments', 'not found in this model')."""
    from medlora.modeling import parse_target_modules
    from medlora.train import build_trainer

    model, data, lora, train, _ = options("--prompt_template_name", "med_template", "--wandb_run_name", "e1",
                                       "--lora_target_modules", "[q_proj,k_proj,v_proj,o_proj]", "--report_to", "none",
                                       "--output_dir", str(tmp_path / "out"))
    assert data.prompt_template == "med_template" and train.wandb_run_name == "e1"
    assert parse_target_modules(lora.lora_target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert parse_target_modules("['q_proj', \"v_proj\"]") == ["q_proj", "v_proj"]
    assert parse_target_modules(" all-linear ") == "all-linear"
    trainer = build_trainer(torch.nn.Linear(2, 2), None, [], None, train, bf16=False)
    assert trainer.args.run_name == "e1" and trainer.args.report_to == []
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ConfigError, match="--wandb_project: the wandb package is not installed"):
        options("--wandb_project", "med")


def test_flag_equal_to_the_default_still_overrides_the_recipe(tmp_path):
    recipe = write(tmp_path, "lora_r: 32\n")
    assert options("--config", str(recipe), "--lora_r", str(LoraArgs().lora_r))[2].lora_r == LoraArgs().lora_r


def test_seed_alias_flags_override_the_recipe(tmp_path):
    recipe = write(tmp_path, "dtype: fp32\n")
    assert options("--config", str(recipe), "--torch_dtype", "bf16")[0].dtype == "bf16"


def test_yaml_numbers_are_read_as_the_command_line_reads_them(tmp_path):
    # YAML 1.1 (PyYAML) reads `3e-4` as a string; the option is a float whatever the spelling
    recipe = write(tmp_path, "learning_rate: 3e-4\nwarmup_steps: 10\nval_set_size: 500\nfsdp:\nlora_r: '16'\n")
    values = load_recipe(str(recipe))
    assert values == {"learning_rate": 3e-4, "warmup_steps": 10.0, "val_set_size": 500.0, "fsdp": "", "lora_r": 16}
    assert isinstance(values["learning_rate"], float)


def test_unknown_key_is_named(tmp_path):
    recipe = write(tmp_path, "lora_r: 8\nlora_rank: 16\n")
    with pytest.raises(ConfigError, match="unknown option 'lora_rank'"):
        load_recipe(str(recipe))


def test_unknown_key_is_one_line_from_the_cli(tmp_path, capsys):
    recipe = write(tmp_path, "micro_batchsize: 4\n")
    assert main(["finetune", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'micro_batchsize'" in err and str(recipe) in err


@pytest.mark.parametrize("text, key", [("lora_r: eight\n", "lora_r"), ("lora_r: 8.5\n", "lora_r"),
                                       ("fast_loss: maybe\n", "fast_loss"), ("num_epochs: [1, 2]\n", "num_epochs"),
                                       ("max_steps: true\n", "max_steps"), ("learning_rate:\n", "learning_rate")])
def test_wrongly_typed_value_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"option '{key}' must be"):
        load_recipe(str(write(tmp_path, text)))


@pytest.mark.parametrize("text, message", [("- lora_r: 8\n", "must be a mapping"), ("lora_r: [8\n", "not valid YAML")])
def test_malformed_recipe(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(str(write(tmp_path, text)))


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(str(tmp_path / "absent.yaml"))


def test_empty_recipe_means_defaults(tmp_path):
    assert load_recipe(str(write(tmp_path, "# nothing yet\n"))) == {}


def test_demo_reuses_an_adapter_only_of_the_same_recipe_and_data(tmp_path, tiny_adapter, tiny_records_file):
    """`make demo` trains again when the recipe or the training data changed since the adapter was made."""
    from medlora.demo import adapter_is_current
    from medlora.io import file_sha256

    meta = json.loads((tiny_adapter / "medlora.json").read_text(encoding="utf-8"))
    data_path = meta["data_args"]["data_path"]
    assert meta["data_sha256"] == {data_path: file_sha256(tiny_records_file)}  # what training records
    data = tmp_path / "train.jsonl"
    shutil.copy(tiny_records_file, data)
    adapter = Path(shutil.copytree(tiny_adapter, tmp_path / "adapter"))
    meta["data_args"]["data_path"] = str(data)
    meta["data_sha256"] = {str(data): file_sha256(data)}
    (adapter / "medlora.json").write_text(json.dumps(meta), encoding="utf-8")
    recipe = write(tmp_path, f"base_model: {meta['base_model']}\ndata_path: {data}\nlora_r: {meta['lora_args']['lora_r']}\n")
    assert adapter_is_current(adapter, recipe)
    assert not adapter_is_current(adapter, write(tmp_path, f"data_path: {data}\nlora_r: 64\n"))  # another recipe
    data.write_text(data.read_text(encoding="utf-8") + data.read_text(encoding="utf-8"), encoding="utf-8")
    assert not adapter_is_current(adapter, recipe)  # the same recipe over rebuilt data
    del meta["data_sha256"]
    (adapter / "medlora.json").write_text(json.dumps(meta), encoding="utf-8")
    shutil.copy(tiny_records_file, data)
    assert not adapter_is_current(adapter, recipe)  # an adapter from before data hashes were recorded


def test_yaml_aliases_are_refused_and_errors_stay_short(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nlora_r: [*b, *b, *b, *b, *b]\n"
    with pytest.raises(ConfigError) as caught:
        load_recipe(str(write(tmp_path, bomb)))
    assert "line 2: YAML aliases (*name) are not allowed in a recipe" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_recipe(str(write(tmp_path, "lora_target_modules: [" + "q_proj, " * 10000 + "]\n")))
    assert "option 'lora_target_modules' must be str" in str(caught.value) and len(str(caught.value)) < 300


def test_a_binary_or_folder_recipe_gets_one_line(tmp_path):
    binary = tmp_path / "r.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a text file"):
        load_recipe(str(binary))
    with pytest.raises(ConfigError, match="is a folder, not a recipe file"):
        load_recipe(str(tmp_path))


# Recipe-like YAML: known and unknown keys, values of every YAML kind, anchors and aliases, and stray text.
_KEYS = ["lora_r", "learning_rate", "num_epochs", "output_dir", "prompt_template", "knowledge", "cutoff_len",
         "fast_loss", "warmup_steps", "seed", "bogus", "<<"]
_VALUES = ["8", "-1", "1e400", ".nan", "-.inf", "true", "null", "~", "[1, 2]", "{a: 1}", "&a [x]", "*a", "'x'",
           "\"\\ud800\"", "!!binary aGk=", "!!python/object:os.system x", "3e-4", "runs/x", "/proc/x", "''"]


def _recipe_text():
    from hypothesis import strategies as st

    line = st.builds(lambda k, v: f"{k}: {v}", st.sampled_from(_KEYS), st.sampled_from(_VALUES))
    structured = st.lists(line, max_size=12).map("\n".join)
    return st.one_of(structured, st.text(max_size=400), st.binary(max_size=400).map(lambda b: b.decode("latin-1")))


def test_any_small_recipe_parses_or_gives_one_short_line(tmp_path):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_recipe_text())
    def check(text):
        path = tmp_path / "r.yaml"
        path.write_bytes(text.encode("utf-8", errors="replace")[:4096])
        try:
            build_options(load_recipe(str(path)))
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) <= 300, message
    check()


def test_one_name_equals_path_parser_for_adapter_and_results_lists(tmp_path):
    from medlora.commands._common import named_paths

    odd = tmp_path / "a=b"  # a folder whose name holds '=' is a path, not NAME=PATH
    odd.mkdir()
    assert named_paths(["runs/x/", "med=runs/y", str(odd)], "--lora_weights") == [
        ("x", "runs/x/"), ("med", "runs/y"), ("a=b", str(odd))]
    assert named_paths(["ev/base/results.jsonl"], "--results", default_name=lambda p: Path(p).parent.name) == [
        ("base", "ev/base/results.jsonl")]
    with pytest.raises(ConfigError, match="the name 'x' is given twice"):
        named_paths(["runs/x", "x=other"], "--lora_weights")
    with pytest.raises(ConfigError, match="expected NAME=PATH or PATH"):
        named_paths(["med="], "--lora_weights")


def test_every_command_reads_a_recipe_and_its_flags_win(tmp_path, capsys):
    recipe = write(tmp_path, "host: 256.0.0.1\nport: 9\nmax_batch_size: 4\n")
    assert main(["serve", "--config", str(recipe), "--port", "8123"]) == 2
    assert "cannot serve on 256.0.0.1:8123" in capsys.readouterr().err  # host from the recipe, port from the flag
    for text, message in (("lora_rank: 8\n", "unknown option 'lora_rank' (known: see `medlora eval --help`)"),
                          ("data_format: xml\n", "option 'data_format' must be one of auto, alpaca"),
                          ("lora_weights: {a: b}\n", "option 'lora_weights' must be a string or a list")):
        assert main(["eval", "--config", str(write(tmp_path, text))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_same_flags_mean_the_same_thing_in_every_command_and_the_old_spellings_stay():
    for command, data_dest, out_dest in (("finetune", "data_path", "output_dir"), ("infer", "instruct_dir",
                                         "model_output_dir"), ("eval", "data", "out")):
        for data_flag in ("--data", "--data_path"):
            for out_flag in ("--out", "--output_dir"):
                args = build_parser(only=command).parse_args([command, data_flag, "d.jsonl", out_flag, "o"])
                assert (getattr(args, data_dest), getattr(args, out_dest)) == ("d.jsonl", "o")
    old = build_parser(only="infer").parse_args(["infer", "--instruct_dir", "d", "--model_output_dir", "o"])
    assert (old.instruct_dir, old.model_output_dir) == ("d", "o")
    assert build_parser(only="merge").parse_args(["merge", "--base_model", "b", "--lora_weights", "a",
                                                  "--output_dir", "o"]).out == "o"


@pytest.mark.parametrize("command, recipe, missing", [
    (["merge"], "base_model: tiny-qwen2\nlora_weights: {gone}\nout: {tmp}/merged\n", "--out"),
    (["export"], "base_model: tiny-qwen2\nlora_weights: {gone}\nout: {tmp}/m.gguf\n", "--out"),
    (["data", "pairs"], "lora_weights: {gone}\nout: {tmp}/pairs.jsonl\nper_kind: 2\n", "--lora_weights"),
])
def test_a_recipe_can_give_the_required_options(tmp_path, capsys, command, recipe, missing):
    """Required options are checked after the recipe is read: a complete recipe runs (here into the missing adapter's
    one-line error), and without the recipe the option is still required."""
    gone = tmp_path / "no-adapter"
    path = write(tmp_path, recipe.format(gone=gone, tmp=tmp_path))
    assert main([*command, "--config", str(path)]) == 2
    assert f"--lora_weights {gone}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--base_model", "tiny-qwen2"] if command[0] != "data" else command)
    err = capsys.readouterr().err
    assert "the following arguments are required" in err and missing in err
