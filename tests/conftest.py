"""Shared fixtures: a tiny Qwen2 model with the real Qwen tokenizer, and a small adapter trained on it.

Everything runs offline on CPU. MEDLORA_HOME points to one cache per test session (or to the caller's, when
set, so repeated runs reuse the prepared tiny model).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# End-to-end files: they train adapters, start servers or run the CLI in fresh processes (`make test-e2e`); the rest
# are unit tests of the library's functions on the tiny model (`make test-unit`). `make test` runs both.
E2E_FILES = {"test_atomic_outputs.py", "test_bad_inputs.py", "test_chat.py", "test_conversations.py",
             "test_distributed.py", "test_export_gguf.py", "test_knowledge_tuning.py", "test_llamacpp_agreement.py",
             "test_merge.py", "test_pipeline.py", "test_prefer.py", "test_resilience.py", "test_serve.py",
             "test_server_abuse.py", "test_speedups.py", "test_webui.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in E2E_FILES:
            item.add_marker(pytest.mark.e2e)


# A few short records the tiny model can learn by heart (our own text).
TINY_RECORDS = [
    {"instruction": "感冒的常见症状是什么？", "input": "", "output": "鼻塞、流涕、咽痛。"},
    {"instruction": "高血压应该去哪个科室？", "input": "", "output": "心内科。"},
    {"instruction": "糖尿病的典型症状有哪些？", "input": "", "output": "多饮、多尿、多食、体重下降。"},
    {"instruction": "肺结核的病原体是什么？", "input": "", "output": "结核分枝杆菌。"},
    {"instruction": "缺铁性贫血常用什么药？", "input": "", "output": "硫酸亚铁。"},
    {"instruction": "哮喘发作时首选什么药物？", "input": "患者为成人。", "output": "沙丁胺醇吸入。"},
    {"instruction": "乙肝的主要传播途径？", "input": "", "output": "血液、母婴和性接触传播。"},
    {"instruction": "痛风急性发作常用什么药？", "input": "", "output": "秋水仙碱。"},
]


@pytest.fixture(scope="session", autouse=True)
def medlora_home(tmp_path_factory):
    home = os.environ.get("MEDLORA_TEST_HOME") or str(tmp_path_factory.mktemp("medlora_home"))
    os.environ["MEDLORA_HOME"] = home
    return Path(home)


@pytest.fixture(scope="session")
def tiny_model(medlora_home) -> str:
    """The built-in `tiny-qwen2`, prepared once per session; returns its name."""
    from medlora.registry import prepare_builtin

    prepare_builtin("tiny-qwen2")
    return "tiny-qwen2"


@pytest.fixture(scope="session")
def tiny_records_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TINY_RECORDS), encoding="utf-8")
    return path


def run_medlora(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m medlora.cli ARGS` in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "medlora.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"medlora {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


LEARN_FLAGS = ["--lora_target_modules", "all-linear", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0",
               "--learning_rate", "1e-2", "--batch_size", "8", "--micro_batch_size", "8", "--warmup_steps", "0",
               "--save_steps", "1000", "--logging_steps", "5", "--dtype", "fp32"]


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tiny_records_file, tmp_path_factory) -> Path:
    """An adapter trained on TINY_RECORDS until it reproduces them (built once per session, in process)."""
    out = tmp_path_factory.mktemp("adapter") / "tiny-adapter"
    from medlora.cli import main

    code = main(["finetune", "--base_model", tiny_model, "--data_path", str(tiny_records_file), "--output_dir",
                 str(out), "--num_epochs", "60", *LEARN_FLAGS])
    assert code == 0
    return out


# A made-up knowledge base (our own names and items), so that nothing here can come from a model's pretraining.
FICTIONAL = [
    {"name": "青岚热", "aliases": ["岚热"], "department": "感染科", "drugs": ["甲泊韦"], "symptoms": ["发热", "斑疹"]},
    {"name": "石垣病", "department": "骨科", "drugs": ["乙洛芬"], "symptoms": ["关节僵硬"]},
    {"name": "雾川综合征", "department": "呼吸内科", "drugs": ["丙索特"], "symptoms": ["咳嗽"]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def knowledge_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("knowledge") / "fictional.jsonl", FICTIONAL)


@pytest.fixture(scope="session")
def knowledge_adapter(tiny_model, knowledge_file, tmp_path_factory) -> Path:
    """A tiny adapter trained with --knowledge on the fictional knowledge file."""
    folder = tmp_path_factory.mktemp("kadapter")
    data = write_jsonl(folder / "train.jsonl", [
        {"instruction": f"{d['name']}用什么药？", "input": "", "output": f"{d['drugs'][0]}。"} for d in FICTIONAL])
    out = folder / "adapter"
    from medlora.cli import main

    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(data), "--output_dir", str(out),
                 "--knowledge", str(knowledge_file), "--knowledge_noise", "0", "--max_steps", "2", *LEARN_FLAGS]) == 0
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def running_medlora(args: list[str], log_path: Path, ready_path: str = "/health", seconds: float = 180):
    """Run `medlora ARGS --port P` on loopback; yield its base URL once `ready_path` answers 200; stop it after.

    The process's output goes to `log_path` and is shown when it fails to come up.
    """
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "medlora.cli", *args, "--port", str(port)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + seconds
        while not _answers(url + ready_path):
            if proc.poll() is not None:
                pytest.fail(f"medlora {args[0]} exited {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"medlora {args[0]} did not come up in {seconds}s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
