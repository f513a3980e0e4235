"""Continuous batching (medlora.batching): the refill loop shared by eval/infer and the server."""

import threading
import time

import pytest
import torch

import medlora.batching as batching
from medlora.batching import Request
from medlora.config import GenerationArgs
from medlora.generate import Generator

PROMPTS = ["头痛", "发烧三天了怎么办？", "糖尿病人能吃什么水果", "咳嗽", "孩子晚上睡不着觉，白天没精神，需要看医生吗？",
           "高血压要吃一辈子药吗", "胃疼", "感冒和流感有什么区别？哪个更严重？", "腰痛", "过敏性鼻炎怎么治"]


@pytest.fixture(scope="module")
def generator(tiny_model):
    return Generator.load(tiny_model, prompt_template="med_template", dtype="fp32")  # a template with stop strings


def _answer_tokens(generator, prompts, gen) -> list[list[int]]:
    """Each prompt's greedy answer tokens from a static `generate` call."""
    encoded = generator._encode(prompts, gen)
    out = generator.model.generate(**encoded, **generator._generate_kwargs(gen, encoded["input_ids"].shape[1]))
    return out[:, encoded["input_ids"].shape[1]:].tolist()


def test_refilled_rows_give_the_static_batches_greedy_answers(generator, monkeypatch):
    gen = GenerationArgs(max_new_tokens=24, frequency_penalty=0.5)
    # The random model never ends an answer: make two of its tokens end-of-answer, so rows end at different steps.
    plain = _answer_tokens(generator, PROMPTS, gen)
    monkeypatch.setattr(generator, "eos_ids", {plain[0][5], plain[3][11]})
    joins = []
    real_join = batching._join
    monkeypatch.setattr(batching, "_join", lambda *args: joins.append(1) or real_join(*args))
    static = generator.generate(PROMPTS, gen, batch_size=3, continuous=False)
    continuous = generator.generate(PROMPTS, gen, batch_size=3)
    assert len({a.n_tokens for a in static}) >= 3 and any(a.ended_by_eos for a in static)  # lengths differ
    assert not all(a.ended_by_eos for a in static)
    assert joins  # newcomers joined rows that were still running
    assert [(a.text, a.n_tokens, a.ended_by_eos) for a in continuous] == [
        (a.text, a.n_tokens, a.ended_by_eos) for a in static]


def test_each_row_keeps_its_own_settings_and_penalties(generator):
    settings = [GenerationArgs(max_new_tokens=12, repetition_penalty=1e4),
                GenerationArgs(max_new_tokens=20, frequency_penalty=1.5, presence_penalty=0.5),
                GenerationArgs(max_new_tokens=5),
                GenerationArgs(max_new_tokens=9, presence_penalty=2.0)]
    prompts = PROMPTS[:4]
    alone = [_answer_tokens(generator, [p], gen)[0] for p, gen in zip(prompts, settings)]
    assert len({tuple(tokens) for tokens in alone}) == 4
    waiting = [Request(generator.tokenizer(p)["input_ids"], gen, tag=i)
               for i, (p, gen) in enumerate(zip(prompts, settings))]
    done = {}
    generator.refill_loop(2).run(lambda n: [waiting.pop(0) for _ in range(min(n, len(waiting)))],
                                 lambda finished: done.update({finished.request.tag: finished}))
    assert [done[i].tokens for i in range(4)] == alone
    assert [done[i].reason for i in range(4)] == ["length"] * 4
    assert len(set(done[0].tokens)) == len(done[0].tokens)  # the prohibitive repetition penalty held in the batch


def test_columns_no_row_uses_are_dropped(generator):
    """Once the long prompt's row ends, the batch is no wider than the short rows need."""
    widths = []
    handle = generator.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["attention_mask"].shape[1]), with_kwargs=True)
    tokenizer = generator.tokenizer
    long_ids = tokenizer("一个很长的问题" * 12)["input_ids"]
    short_ids = tokenizer("头痛")["input_ids"]
    waiting = [Request(long_ids, GenerationArgs(max_new_tokens=2)),
               Request(short_ids, GenerationArgs(max_new_tokens=30))]
    try:
        generator.refill_loop(2).run(lambda n: [waiting.pop(0) for _ in range(min(n, len(waiting)))], lambda f: None)
    finally:
        handle.remove()
    assert widths[0] == len(long_ids) and max(widths) >= len(long_ids) + 1
    assert widths[-1] == len(short_ids) + 29  # the long row's columns are gone


def test_a_cancelled_row_ends_at_the_next_step_and_its_neighbours_go_on(generator):
    cancel = threading.Event()
    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 3:
            cancel.set()

    ids = [generator.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    waiting = [Request(ids[0], GenerationArgs(max_new_tokens=20), "cancelled", on_token, cancel),
               Request(ids[1], GenerationArgs(max_new_tokens=20), "other")]
    done = {}
    generator.refill_loop(2).run(lambda n: [waiting.pop(0) for _ in range(min(n, len(waiting)))],
                                 lambda f: done.update({f.request.tag: f}))
    assert done["cancelled"].reason == "stop" and done["cancelled"].tokens == seen and len(seen) == 3
    assert done["other"].reason == "length" and len(done["other"].tokens) == 20


def test_sampled_rows_follow_the_seed(generator):
    gen = GenerationArgs(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=50, top_p=0.9)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([a.text for a in generator.generate(PROMPTS[:4], gen, batch_size=2)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_the_batched_stop_test_is_the_criterion_on_each_whole_sequence(generator):
    """The loop asks once per step for all rows, with each row's prompt and answer; rows of any length."""
    assert generator.template.stop_strings
    tokenizer = generator.tokenizer
    marker = generator.template.stop_strings[0]
    texts = ["头痛要休息", "答：多喝水" + marker, marker[:-1], "发烧" + marker + "就医", marker]
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    stop = generator.refill_loop(4).stop
    one_by_one = [bool(generator._section_stop(torch.tensor([ids]), None)[0]) for ids in sequences]
    assert stop(sequences) == one_by_one == [False, True, False, False, True]


def test_the_server_loop_takes_its_models_requests_until_another_model_has_waited_switch_after():
    """The engine's refill loop admits queued requests for the running model from anywhere in the queue, but not
    those that arrived after a request for another model that has waited `switch_after` seconds."""
    import collections
    import types

    from medlora.serve.engine import Engine, GenerationRequest, _Job

    engine = Engine.__new__(Engine)  # the queue logic only: no model
    engine._wakeup, engine._closed, engine._running, engine.switch_after = threading.Condition(), False, [], 2.0
    stub = types.SimpleNamespace(tokenizer=lambda text, add_special_tokens: {"input_ids": [len(text)]},
                                 template=types.SimpleNamespace(add_special_tokens=False))
    engine.generators = {"a": stub, "b": stub}

    def job(model, queued_at):
        return _Job(GenerationRequest(model, "问", GenerationArgs()), lambda *event: None, False, queued_at=queued_at)

    now = time.monotonic()
    for waited, expected in ((0.5, "a1 a2 a3"), (5.0, "a1")):  # b1 waited 0.5 s: fine; 5 s: its turn comes next
        jobs = {"a1": job("a", now - waited - 1), "b1": job("b", now - waited), "a2": job("a", now - waited + 0.1),
                "a3": job("a", now - waited + 0.2)}
        engine._pending, engine._running = collections.deque(jobs.values()), []
        taken = [request.tag for request in engine._take("a", 8)]
        assert taken == [jobs[name] for name in expected.split()]
        assert list(engine._pending) == [j for j in jobs.values() if j not in taken]
    assert engine._take("a", 8) == []  # a2 and a3 wait behind b1


def test_a_prompt_past_the_context_loses_its_oldest_tokens_and_max_new_tokens_is_bounded(generator, caplog):
    from medlora.errors import ConfigError

    context = generator.context_length
    huge = "头痛" * context  # more tokens than the whole context
    gen = GenerationArgs(max_new_tokens=8)
    ids = generator.prompt_ids([huge, "头痛"], gen)
    assert len(ids[0]) == context - 8 and ids[0][-5:] == generator.tokenizer(huge)["input_ids"][-5:]
    assert ids[1] == generator.tokenizer("头痛")["input_ids"]
    assert "oldest tokens were left out" in caplog.text
    assert generator.generate([huge], gen)[0].n_tokens <= 8
    with pytest.raises(ConfigError, match="--max_new_tokens 100000"):
        generator.generate(["头痛"], GenerationArgs(max_new_tokens=100000))


def test_open_register_lets_the_likelier_register_win_not_the_likeliest_token():
    from medlora.batching import open_register
    from medlora.errors import ConfigError

    # token 0 is the urgent opener: likeliest single token (0.3) but the calm tokens hold 0.7 together
    calm_wins = torch.tensor([[0.3, 0.25, 0.25, 0.2]]).log()
    assert open_register(calm_wins, [0], 0.5).argmax().item() == 1
    assert open_register(calm_wins, [0], 0.29).argmax().item() == 0  # a lower threshold keeps it
    # two urgent openers hold 0.56 together although a calm token is the likeliest
    urgent_wins = torch.tensor([[0.28, 0.28, 0.44]]).log()
    assert open_register(urgent_wins, [0, 1], 0.5).argmax().item() in (0, 1)
    assert open_register(urgent_wins, [0, 1], 0.6).argmax().item() == 2
    with pytest.raises(ConfigError, match="--urgent_threshold must be at least 0 and below 1"):
        GenerationArgs(urgent_threshold=1.0)


def test_the_urgent_threshold_sets_the_first_token_on_both_decoding_paths(generator):
    from medlora.vocab import URGENT_OPENERS

    urgent = set(generator.urgent_ids)
    assert urgent and len(urgent) <= len(URGENT_OPENERS)
    first = {}
    for threshold in (0.0, 1e-12):  # off, and a threshold every urgent opener clears: all answers open urgent
        gen = GenerationArgs(max_new_tokens=4, urgent_threshold=threshold)
        static = _answer_tokens(generator, PROMPTS, gen)
        continuous = generator.generate(PROMPTS, gen, batch_size=3)
        assert [generator.tokenizer.decode(tokens).strip() for tokens in static] == [a.text for a in continuous]
        first[threshold] = [tokens[0] for tokens in static]
    assert not set(first[0.0]) & urgent  # the random model never opens with one by itself
    assert set(first[1e-12]) <= urgent
