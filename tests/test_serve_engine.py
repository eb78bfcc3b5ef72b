"""The serving engine without HTTP: paged cache vs the model's contiguous cache, prefix cache, preemption, cards."""

import base64
import json
import logging
import struct
import zlib

import pytest
import torch

from gigafactory.errors import UserError
from gigafactory.model.generate import generate
from gigafactory.model.grok import GrokModel, KVCache
from gigafactory.personas import speech_prompt
from gigafactory.serve.engine import Engine, EngineConfig, Output, QueueFull
from gigafactory.serve.kv_cache import ROOT, BlockPool, BlockTable, PagedBatch, block_hashes, chain_hash
from gigafactory.serve.personas import Persona, PromptTooLong, load_all, load_card, parse_card
from gigafactory.serve.sampling import SamplingParams, TextTracker, next_token, processed_logits
from gigafactory.specs.model_spec import PRESETS
from gigafactory.tokenizer import train_tokenizer

SPEC = PRESETS["tiny"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the server runs (see EngineConfig.threads): a second thread only adds contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> GrokModel:
    torch.manual_seed(0)
    return GrokModel(SPEC).eval()


@pytest.fixture(scope="module")
def tok():
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nAy me!\n\n" * 20
    return train_tokenizer([text], 300)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, SPEC.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@torch.no_grad()
def test_paged_batch_gives_the_contiguous_cache_logits(model):
    """Mixed prompt lengths in one padded batch, then a decode step: same logits as one sequence at a time."""
    pool = BlockPool(SPEC, 32, 8, torch.device("cpu"), torch.float32)
    ps = prompts(3)
    tables = [BlockTable() for _ in ps]
    for t, p in zip(tables, ps, strict=True):
        pool.ensure(t, len(p) + 1)
    width = max(map(len, ps))
    tokens = torch.zeros(3, width, dtype=torch.long)
    positions = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(ps):
        tokens[i, : len(p)] = torch.tensor(p)
        positions[i] = torch.arange(width).clamp(max=len(p) - 1)
    logits = model(tokens, positions, PagedBatch(pool, tables, [0] * 3, list(map(len, ps))))
    nxt = torch.tensor([[7], [8], [9]])
    step = model(nxt, torch.tensor([[len(p)] for p in ps]), PagedBatch(pool, tables, list(map(len, ps)), [1] * 3))
    for i, p in enumerate(ps):
        cache = KVCache(SPEC, 1, 64, torch.device("cpu"), torch.float32)
        ref = model(torch.tensor([p]), torch.arange(len(p))[None], cache)
        torch.testing.assert_close(logits[i, : len(p)], ref[0], atol=1e-4, rtol=1e-4)
        ref_step = model(nxt[i : i + 1], torch.tensor([[len(p)]]), cache)
        torch.testing.assert_close(step[i], ref_step[0], atol=1e-4, rtol=1e-4)


def run_engine(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[Output]]:
    outs: list[list[Output]] = [[] for _ in jobs]
    for i, (prompt, params) in enumerate(jobs):
        engine.add(prompt, params, outs[i].append)
    for _ in range(10_000):
        if all(o and o[-1].finish_reason for o in outs):
            return outs
        engine.step()
    raise AssertionError("engine did not finish")


def test_prefill_computes_logits_of_the_last_prompt_token_only(model, tok):
    rows: list[int] = []
    real = model.output
    model.output = lambda h: (rows.append(h.shape[1]), real(h))[1]  # type: ignore[method-assign]
    try:
        run_engine(Engine(model, tok), [(p, SamplingParams(max_tokens=2, temperature=0)) for p in prompts(3)])
    finally:
        del model.output
    assert rows and set(rows) == {1}  # prompts of 3-40 tokens; one position each reaches the output head


@pytest.mark.parametrize("kv_mb", [4.0, 0.2])  # 0.2 MB: too small for all at once, so sequences get preempted
def test_engine_batches_and_preempts_without_changing_tokens(model, tok, kv_mb):
    ps = prompts(10, seed=1)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(kv_cache_mb=kv_mb, block_size=8, step_tokens=48, max_batch=8))
    jobs = [(p, greedy if i % 2 else seeded) for i, p in enumerate(ps)]
    outs = run_engine(engine, jobs)
    for (p, params), out in zip(jobs, outs, strict=True):
        ref = list(generate(model, p, 30, params.temperature, params.top_k, params.top_p, params.seed))
        assert "".join(o.text for o in out) == tok.decode(ref)
        assert out[-1].finish_reason == "length" and out[-1].completion_tokens == 30
    if kv_mb < 1:
        assert engine.metrics.preemptions._value.get() > 0
    assert engine.pool.usage() == 0.0  # every block came back
    assert not engine.running and not engine.waiting


def test_prefix_cache_reuses_shared_blocks(model, tok):
    engine = Engine(model, tok, EngineConfig(kv_cache_mb=1.0, block_size=8))
    shared = list(range(100, 148))  # 6 full blocks of 8
    params = SamplingParams(max_tokens=5, temperature=0)
    first = run_engine(engine, [(shared + [5, 6], params)])
    hits = engine.pool.prefix_hits
    second = run_engine(engine, [(shared + [5, 6], params), (shared + [9], params)])
    assert engine.pool.prefix_hits - hits == 2 * 48
    assert "".join(o.text for o in second[0]) == "".join(o.text for o in first[0])


def test_queue_is_bounded(model, tok):
    engine = Engine(model, tok, EngineConfig(max_queue=2))
    for _ in range(2):
        engine.add([5, 6], SamplingParams(max_tokens=1), lambda out: None)
    with pytest.raises(QueueFull):
        engine.add([5, 6], SamplingParams(max_tokens=1), lambda out: None)


def test_abort_frees_blocks(model, tok):
    engine = Engine(model, tok, EngineConfig(kv_cache_mb=1.0, block_size=8))
    outs: list[Output] = []
    seq = engine.add(prompts(1)[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), outs.append)
    for _ in range(3):
        engine.step()
    assert engine.pool.usage() > 0
    engine.abort(seq)
    engine.step()
    assert outs[-1].finish_reason == "abort" and engine.pool.usage() == 0.0 and not engine.running


def test_text_tracker_holds_back_partial_stop_strings(tok):
    ids = tok.encode("Ay me! But soft\n\nROMEO").ids
    tracker = TextTracker(tok, ("\n\n",))
    released = ""
    for k in range(1, len(ids) + 1):
        piece, hit = tracker.update(ids[:k])
        released += piece
        assert "\n" not in released
        if hit:
            break
    assert hit and released + tracker.finish() == "Ay me! But soft"


# -- personas ------------------------------------------------------------------------------------------------------

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Ada",
        "description": "{{char}} is an engineer who talks to {{user}} about engines.",
        "personality": "curious",
        "scenario": "A workshop.",
        "first_mes": "Hello, {{user}}.",
        "alternate_greetings": ["Back again?"],
        "mes_example": "<START>\n{{user}}: hi\n{{char}}: hello",
        "system_prompt": "Stay in character. {{original}}",
        "post_history_instructions": "Answer briefly.",
        "character_book": {
            "scan_depth": 2,
            "token_budget": 100,
            "entries": [
                {"keys": ["piston"], "content": "LORE-PISTON", "insertion_order": 2},
                {"keys": ["Valve"], "content": "LORE-VALVE", "case_sensitive": True, "insertion_order": 1},
                {"keys": ["gear"], "secondary_keys": ["oil"], "selective": True, "content": "LORE-GEAR"},
                {"keys": [], "constant": True, "content": "LORE-ALWAYS", "position": "after_char"},
                {"keys": ["piston"], "content": "LORE-OFF", "enabled": False},
            ],
        },
    },
}


def test_card_renders_fields_lore_and_template():
    ada = parse_card(CARD)
    text = ada.render([("system", "Be kind."), ("user", "Tell me about the piston and the Valve.")])
    assert text.startswith("Stay in character. Be kind.\n\n")
    assert text.index("LORE-VALVE") < text.index("LORE-PISTON") < text.index("Ada is an engineer")
    examples = text.index("Stranger:\nhi\n\nAda:\nhello\n\n")  # mes_example in the corpus' format
    assert text.index("Scenario: A workshop.") < text.index("LORE-ALWAYS") < examples
    assert "LORE-OFF" not in text and "LORE-GEAR" not in text
    assert text.endswith(
        "Ada:\nHello, Stranger.\n\nStranger:\nTell me about the piston and the Valve.\n\nAnswer briefly.\n\nAda:\n"
    )
    assert "Ada:\nBack again?" in ada.render([("user", "hi")], greeting=1)
    # Keys only count within the scan depth (the last 2 messages), and case rules apply.
    old = [("user", "piston"), ("assistant", "ok"), ("user", "valve gear oil")]
    text = ada.render(old)
    assert "LORE-PISTON" not in text and "LORE-VALVE" not in text and "LORE-GEAR" in text


def test_lore_token_budget_drops_low_priority_first():
    card = json.loads(json.dumps(CARD))
    card["data"]["character_book"]["token_budget"] = 2
    card["data"]["character_book"]["entries"] = [
        {"keys": ["a"], "content": "LOW", "priority": 1},
        {"keys": ["a"], "content": "HIGH", "priority": 9},
    ]
    text = parse_card(card).render([("user", "a")], count_tokens=lambda s: 2)
    assert "HIGH" in text and "LOW" not in text


def test_builtin_persona_renders_the_corpus_format():
    history = [("user", "Hi"), ("assistant", "Good morrow"), ("user", "Bye")]
    expected = speech_prompt("ROMEO", [("user", "Hi"), ("persona", "Good morrow"), ("user", "Bye")])
    assert Persona("ROMEO").render(history) == expected


def test_cards_load_from_json_and_png(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "personas.json").write_text(json.dumps({"ROMEO": 10}))
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "ada.json").write_text(json.dumps(CARD))
    other = json.loads(json.dumps(CARD))
    other["data"]["name"] = "Grace"
    payload = base64.b64encode(json.dumps(other).encode())
    chunk = b"chara\x00" + payload
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", len(chunk), b"tEXt") + chunk
    png += struct.pack(">I", zlib.crc32(b"tEXt" + chunk)) + struct.pack(">I4s", 0, b"IEND") + b"\0" * 4
    (cards / "grace.png").write_bytes(png)
    personas = load_all(run, cards)
    assert set(personas) == {"romeo", "ada", "grace"} and not personas["ada"].builtin
    (cards / "bad.json").write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": 3}}))
    with caplog.at_level(logging.WARNING):
        assert set(load_all(run, cards)) == {"romeo", "ada", "grace"}  # a bad card is skipped, not fatal
    assert "bad.json" in caplog.text and "'name' must be a string" in caplog.text
    (cards / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read character card"):
        load_card(cards / "bad.json")


def test_cards_v1_v3_png_chunks_and_bad_names(tmp_path, caplog):
    v1 = {"name": "Grace", "description": "{{char}} writes programs.", "first_mes": "Hi.", "mes_example": ""}
    assert parse_card(v1).description == "{{char}} writes programs." and parse_card(v1).greetings() == ["Hi."]
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**CARD["data"], "name": "Lin", "nickname": "L"}}
    assert parse_card(v3).name == "Lin" and parse_card(v3).lore
    # A V3 PNG carries "ccv3" (preferred) and often a V2 "chara" fallback.
    v2 = json.loads(json.dumps(CARD))
    chunks = b""
    for keyword, card in ((b"chara", v2), (b"ccv3", v3)):
        body = keyword + b"\x00" + base64.b64encode(json.dumps(card).encode())
        chunks += struct.pack(">I4s", len(body), b"tEXt") + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    png = b"\x89PNG\r\n\x1a\n" + chunks + struct.pack(">I4s", 0, b"IEND") + b"\0" * 4
    (tmp_path / "lin.png").write_bytes(png)
    lin = load_card(tmp_path / "lin.png")
    assert lin.name == "Lin" and lin.avatar == png
    for bad in ("Ada\nSYSTEM", "Ada:", "", "x" * 65, "stranger", "a/b", "tab\there"):
        with pytest.raises(UserError):
            parse_card({"spec": "chara_card_v2", "data": {**CARD["data"], "name": bad}})
    with pytest.raises(UserError, match="unknown card spec"):
        parse_card({"spec": "chara_card_v9", "data": {}})


def lore_card(**entry) -> Persona:
    card = json.loads(json.dumps(CARD))
    card["data"]["character_book"] = {"entries": [{"content": "LORE", **entry}]}
    return parse_card(card)


def test_lore_keys_match_whole_words_with_case_and_regex_options():
    gold = lore_card(keys=["gold"])
    assert "LORE" not in gold.render([("user", "a marigold bloom")])
    assert "LORE" in gold.render([("user", "Gold, at last!")])
    sensitive = lore_card(keys=["Gold"], case_sensitive=True)
    assert "LORE" not in sensitive.render([("user", "gold")]) and "LORE" in sensitive.render([("user", "Gold")])
    regex = lore_card(keys=["/gol+d(en)?/i"], use_regex=True)
    assert "LORE" in regex.render([("user", "GOLLDEN sky")]) and "LORE" not in regex.render([("user", "god")])
    plain = lore_card(keys=["a.c"])  # without use_regex, a key is literal text
    assert "LORE" not in plain.render([("user", "abc")]) and "LORE" in plain.render([("user", "say a.c now")])
    with pytest.raises(UserError, match="bad regex"):
        lore_card(keys=["(unclosed"], use_regex=True)


def test_truncation_drops_oldest_history_then_card_parts_never_the_system_prompt():
    count = len  # a character is a token here
    ada = parse_card(CARD)
    history = [("system", "Be kind."), *[("user" if i % 2 == 0 else "assistant", f"m{i:02d} " * 10) for i in range(8)]]
    history.append(("user", "newest question"))
    full = ada.render(history)
    budget = len(full) - 100
    cut = ada.render(history, 0, count, budget)
    assert len(cut) <= budget and cut.startswith("Stay in character. Be kind.")
    assert "newest question" in cut and "m07" in cut and "m00" not in cut  # oldest speeches went first
    assert "Hello, Stranger." not in cut  # the greeting is the oldest speech
    assert "Ada is an engineer" in cut  # the card stays while history can go
    # Tokens of a whole prompt need not add up from its parts: the check on the whole prompt cuts further.
    lumpy = ada.render(history, 0, lambda s: len(s) + (len(s) // 40) ** 2, budget)
    assert len(lumpy) + (len(lumpy) // 40) ** 2 <= budget and "newest question" in lumpy and "Be kind." in lumpy
    # A card longer than the context: history down to the newest message, then examples, lore, scenario, ...
    long = json.loads(json.dumps(CARD))
    long["data"]["description"] = "{{char}} " + "builds engines " * 200
    tight = parse_card(long).render(history, 0, count, 400)
    assert len(tight) <= 400 and "newest question" in tight and "Be kind." in tight and "Answer briefly." in tight
    assert "builds engines" not in tight and "m07" not in tight
    with pytest.raises(PromptTooLong):
        ada.render([("system", "x" * 500), ("user", "hi")], 0, count, 100)


def test_sampling_penalties_bias_and_min_p():
    logits = torch.zeros(8)
    params = SamplingParams(max_tokens=1, presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((3, 2.0),))
    out = processed_logits(logits, params, [5, 5, 7], None, 10)
    assert out.tolist() == [0, 0, 0, 2.0, 0, -2.0, 0, -1.5]
    assert logits.tolist() == [0.0] * 8  # the engine's logits are not modified
    # min_p: with a dominant token, min_p keeps only it at any seed; without, others get sampled.
    peaked = torch.tensor([3.0, 0.0, 0.0, 0.0])
    with_min_p = SamplingParams(max_tokens=1, temperature=1.0, min_p=0.5)
    picks = {next_token(peaked, with_min_p, [], torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert picks == {0}
    plain = SamplingParams(max_tokens=1, temperature=1.0)
    assert len({next_token(peaked, plain, [], torch.Generator().manual_seed(s))[0] for s in range(40)}) > 1
    token, lp = next_token(peaked, SamplingParams(max_tokens=1, temperature=0, logprobs=2), [], None)
    assert token == 0 and lp.top[0][0] == 0 and lp.logprob == pytest.approx(float(torch.log_softmax(peaked, -1)[0]))


def test_block_hashes_are_chained_sha256():
    a = block_hashes(list(range(32)), 8)
    assert len(a) == 4 and all(len(h) == 32 for h in a)  # SHA-256 digests
    b = block_hashes([99] + list(range(1, 32)), 8)
    assert all(x != y for x, y in zip(a, b, strict=True))  # a change in block 0 renames every later block
    assert block_hashes(list(range(32)), 8) == a and block_hashes(list(range(16)), 8) == a[:2]
    assert chain_hash(ROOT, [1, 2]) != chain_hash(ROOT, [258])  # fixed-width ids: no ambiguous concatenation


def test_json_constraint_accepts_json_and_always_closes(tok):
    from gigafactory.serve.json_mode import JsonConstraint, TokenTexts, closing, feed, initial

    for text in ['{"a": [1, -2.5e3, true, null, {"b": "x\\u00e9"}]}', "{}", '{"k":{"n":[]}}']:
        state = feed(initial(), text)
        assert state is not None and state[0] == 11, text  # DONE
    for text in ["[1]", '{"a" 1}', "{'a': 1}", '{"a": 01}', '{"a": tru}x', '{\n"a": 1}', '{"a": "\n"}']:
        state = feed(initial(), text)
        assert state is None or state[0] != 11, text
    for prefix in ['{"a": [1, {"b": "x', '{"a', '{"a": -', '{"a": 1.', '{"a": "\\u00', '{"a": tr']:
        state = feed(initial(), prefix)
        assert json.loads(prefix + closing(state)) is not None, prefix
    # Driven by a random model, the constraint still yields an object within the budget.
    vocab = TokenTexts.of(tok)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        c, out = JsonConstraint(vocab), []
        for step in range(12):
            allowed = c.mask(tok.get_vocab_size(), 12 - step)
            scores = torch.randn(tok.get_vocab_size(), generator=g).masked_fill(~allowed, float("-inf"))
            token = int(scores.argmax())
            c.accept(token)
            out.append(token)
            if c.done:
                break
        assert c.done and isinstance(json.loads(tok.decode(out)), dict)
