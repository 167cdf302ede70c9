"""The quality benchmark harness (benchmarks/quality): answer extraction, confidence intervals, resumable runs,
region wipe-out and boundary jitter on hand-built compactions, sweep enumeration and the server request payloads.

CPU and fast: a tiny random Llama and a byte-level tokenizer built here, and a few lines of synthetic task data.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import qb_backends as B  # noqa: E402
import qb_harness as H  # noqa: E402
import qb_tasks as T  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from sglang_ams import demo  # noqa: E402
from sglang_ams.config import SCORERS, PolicyConfig, request_override  # noqa: E402
from sglang_ams.reference import Compaction  # noqa: E402


# ------------------------------------------------------------------------------------------------------------------
# Tiny model, tokenizer and data

def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def byte_tokenizer():
    """256 byte ids + <|eos|>, with a chat template (fits the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(tok_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def synthetic_data(root: Path) -> Path:
    data = root / "data"
    (data / "gsm8k").mkdir(parents=True)
    rows = [{"question": f"Tom has {i} apples and buys 2 more. How many apples?",
             "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"} for i in range(3)]
    (data / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "niah_paulgraham_essays" / "essays").mkdir(parents=True)
    (data / "niah_paulgraham_essays" / "essays" / "a.txt").write_text("Some essay sentence here. " * 60)
    (data / "nq_open").mkdir()
    (data / "nq_open" / "NQ-open.dev.jsonl").write_text(json.dumps({"question": "who", "answer": ["Bob Scott"]}))
    (data / "lost_in_the_middle").mkdir()
    import gzip
    records = [[f"{i:08x}-0000-0000-0000-000000000000", f"{i:08x}-1111-1111-1111-111111111111"] for i in range(9)]
    with gzip.open(data / "lost_in_the_middle" / "kv-retrieval-75_keys.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"ordered_kv_records": records, "key": records[6][0], "value": records[6][1]}) + "\n")
    return data


# ------------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring

def test_gsm8k_extraction_matches_demo_check():
    cases = {"so 3 + 4 = 7.\nThe answer is 7.": "7", "The answer is $1,250.": "1250", "It costs 12 then 18": "18",
             "no number": None, "The answer is -3.5": "-3.5", "total: 40.": "40"}
    for text, want in cases.items():
        assert T.gsm8k_extract(text) == want, text
    tok = byte_tokenizer()
    task = demo.gsm8k_task(tok, None)                    # the built-in question, gold 18
    for text in ("The answer is 18.", "she makes 9 * 2 = 18", "The answer is 18.0", "The answer is 19.", "x"):
        assert T.score("gsm8k_cot", text, task.gold) == task.check(text), text
    assert T.score("gsm8k_8shot", "The answer is 1,250", "1250")


def test_math_extraction_and_equivalence():
    assert T.last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert T.last_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert T.last_boxed("no box") is None and T.last_boxed(r"\boxed{open") is None
    assert T.score("math500", r"We get \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)")
    assert T.score("math500", r"\boxed{\dfrac{1}{2}}", r"\frac12")
    assert T.score("math500", r"\boxed{x = 5}", "5") and T.score("math500", r"\boxed{5.0}", "5")
    assert T.score("math500", r"\boxed{90^\circ}", "90") and T.score("math500", r"\boxed{\text{(C)}}", "(C)")
    assert not T.score("math500", r"\boxed{6}", "5") and not T.score("math500", "5", "5")   # unboxed: no answer


def test_retrieval_and_qa_scoring():
    uuid = "bb3ba2a5-7de8-434b-a86e-a88bb9fa7289"
    assert T.extract("kv_retrieval", f'{uuid}" and more') == uuid
    assert T.score("kv_retrieval", f"{uuid}\"", uuid) and not T.score("kv_retrieval", uuid[:-1], uuid)
    assert T.extract("needle", " 48213. Remember") == "48213" and T.extract("needle", "none") is None
    assert T.score("needle", " 48213.", "48213") and not T.score("needle", " 4821", "48213")
    assert T.normalize_qa("The  Beatles!") == "beatles"
    assert T.score("nq_open", "It was the Beatles, in 1964.", ["beatles"])
    assert T.score("triviaqa", "Sinclair Lewis won it", ["(Harry) Sinclair Lewis", "Sinclair Lewis"])
    assert not T.score("nq_open", "Paul McCartney", ["John Lennon"]) and not T.score("nq_open", "x", [""])
    assert T.extract("nq_open", "\n  Bob Scott\nmore") == "Bob Scott"
    with pytest.raises(ValueError):
        T.score("mmlu", "x", "y")


def test_task_loading_on_synthetic_data(tmp_path):
    tok, data = byte_tokenizer(), synthetic_data(tmp_path)
    cot = T.load_examples("gsm8k_cot", tok, data, 2)
    assert [e.id for e in cot] == ["0", "1"] and [e.gold for e in cot] == ["2", "3"]
    assert cot[0].basis == cot[0].max_new_tokens == 256 and not cot[0].forced_ids
    assert T.GSM8K_COT_INSTRUCTION in tok.decode(cot[0].prompt_ids)
    shot = T.load_examples("gsm8k_8shot", tok, data, 1, T.TaskOptions(gsm8k_shots=2, max_new_tokens=64))
    assert shot[0].prompt_ids == demo.gsm8k_task(tok, data, 0, shots=2).prompt_ids and shot[0].max_new_tokens == 64
    grid = T.load_examples("needle", tok, data, None, T.TaskOptions(needle_lengths=(200, 300),
                                                                   needle_depths=(0.1, 0.9)))
    assert [e.id for e in grid] == ["len200-depth0.1-seed0", "len200-depth0.9-seed0", "len300-depth0.1-seed0",
                                    "len300-depth0.9-seed0"]
    assert all(e.basis == len(e.prompt_ids) + len(e.forced_ids) and e.gold in tok.decode(e.prompt_ids)
               for e in grid)
    kv = T.load_examples("kv_retrieval", tok, data, None, T.TaskOptions(kv_keys=4))[0]
    text = tok.decode(kv.prompt_ids)
    assert text.count('": "') == 4 and kv.gold in text and kv.meta == {"keys": 4, "depth": 0.667}
    assert len(kv.forced_ids) > 8 and "is \"" in tok.decode(kv.forced_ids)
    qa = T.load_examples("nq_open", tok, data, 5)
    assert len(qa) == 1 and qa[0].gold == ["Bob Scott"] and qa[0].basis == len(qa[0].prompt_ids) + 32
    with pytest.raises(FileNotFoundError, match="math500"):
        T.load_examples("math500", tok, data, 1)


def test_kv_subsample_keeps_gold_at_its_depth():
    records = [[f"k{i}", f"v{i}"] for i in range(75)]
    for gold in (0, 37, 74):
        sub = T.subsample_kv(records, f"k{gold}", 5)
        assert len(sub) == 5 and [f"k{gold}", f"v{gold}"] in sub
        assert sub.index([f"k{gold}", f"v{gold}"]) == round(gold / 74 * 4)
    assert T.format_kv_records([["a", "b"], ["c", "d"]]) == '{"a": "b",\n "c": "d"}'


# ------------------------------------------------------------------------------------------------------------------
# Confidence intervals

def test_wilson_interval():
    assert H.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert H.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert H.wilson(1, 16) == pytest.approx((0.0111, 0.2833), abs=1e-4)
    lo, hi = H.wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)
    assert H.wilson(0, 0) == (0.0, 1.0)
    lo, hi = H.wilson(30, 100)
    assert lo < 0.3 < hi and hi - lo < H.wilson(3, 10)[1] - H.wilson(3, 10)[0]


# ------------------------------------------------------------------------------------------------------------------
# Wipe-out and jitter on hand-built compactions

def _compaction(step, n, kept_rows):
    kept = torch.tensor(kept_rows, dtype=torch.long)[None]          # [1 layer, H, K]
    return Compaction(step, n, 0, kept)


def test_wipeout_counts_blocks_without_a_kept_token():
    recent = [16, 17, 18, 19]
    c1 = _compaction(0, 20, [[0, 1, 3] + [11] + recent, [0, 1, 7, 8] + recent])
    blocks = [(2, 6), (6, 10), (10, 14), (14, 18)]            # the last one overlaps the recent 4: not eligible
    # head 0 keeps 3 and 11: block (6, 10) wiped; head 1 keeps 7, 8: blocks (2, 6) and (10, 14) wiped.
    assert H.wipeout([c1], blocks, sink=2, keep_lastn=4) == (3, 6)
    # A later compaction at n = 30: all four blocks are eligible; head 0 keeps 15 -> (14, 18) survives.
    c2 = _compaction(10, 30, [[0, 1, 3, 15] + list(range(26, 30)), [0, 1, 7, 20] + list(range(26, 30))])
    assert H.wipeout([c2], blocks, sink=2, keep_lastn=4) == (2 + 3, 8)
    assert H.wipeout([c1, c2], blocks, sink=2, keep_lastn=4) == (8, 14)
    assert H.wipeout([c1], [(0, 4)], sink=2, keep_lastn=4) == (0, 0)          # overlaps the sink: not eligible
    assert H.wipeout([], blocks, 2, 4) == (0, 0) and H.wipeout([c1], [], 2, 4) == (0, 0)


def test_blocks_from_lines_and_fixed_size():
    tok = byte_tokenizer()
    ids = tok("ab\ncd\n\nef", add_special_tokens=False)["input_ids"]
    # A newline token belongs to the line it ends; an empty line joins the line before it.
    assert H.token_lines(tok, ids) == [0, 0, 0, 1, 1, 1, 1, 3, 3]
    assert H.step_blocks(tok, ids, 100) == [(100, 103), (103, 107), (107, 109)]
    assert H.fixed_blocks(4, 70, 32) == [(4, 36), (36, 68), (68, 70)]
    assert H.runs([5, 5, 7], 0) == [(0, 2), (2, 3)] and H.step_blocks(tok, [], 0) == []


def test_slot_positions_and_boundary_jitter():
    # First compaction at n = 12 keeps 6 of 12 slots; the second runs at n = 16 on 6 + 4 slots.
    c1 = Compaction(0, 12, 12, torch.tensor([[[0, 1, 4, 7, 10, 11]]]))
    c2 = Compaction(4, 16, 10, torch.tensor([[[0, 1, 7, 12, 14, 15]]]))
    pos = H.slot_positions([c1, c2])
    assert pos[0].tolist() == [[list(range(12))]]
    assert pos[1].tolist() == [[[0, 1, 4, 7, 10, 11, 12, 13, 14, 15]]]
    with pytest.raises(ValueError, match="reconstructed"):
        H.slot_positions([c1, Compaction(4, 16, 9, c2.kept)])
    # sink 1, keep_lastn 2. Compaction 1: segments of slots 1..9 with starts at positions 1, 4, 7.
    seg1 = torch.tensor([[[-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1]]])
    # Compaction 2 (slots = positions 0 1 4 7 10 11 12 13 14 15): starts at positions 1, 7 and 11.
    seg2 = torch.tensor([[[-1, 0, 0, 1, 1, 2, 2, 2, -1, -1]]])
    assert [b.tolist() for b in H.boundaries(seg1, pos[0])[0]] == [[4, 7]]
    assert [b.tolist() for b in H.boundaries(seg2, pos[1])[0]] == [[7, 11]]
    # Overlap region (sink, 12 - 2) = (1, 10): old {4, 7}, new {7}; distances 7->7 = 0; 4->7 = 3, 7->7 = 0.
    assert H.boundary_jitter([c1, c2], [seg1, seg2], sink=1, keep_lastn=2) == (3.0, 3)
    same = torch.tensor([[[-1, 0, 1, 2, 2, 2, 2, 2, -1, -1]]])         # starts at positions 4 and 7 again
    assert H.boundary_jitter([c1, c2], [seg1, same], sink=1, keep_lastn=2) == (0.0, 4)
    assert H.boundary_jitter([c1], [seg1], 1, 2) == (0.0, 0)


# ------------------------------------------------------------------------------------------------------------------
# Sweep

def test_sweep_enumeration():
    full = H.full_sweep()
    assert len(full) == 1 + 3 + len(SCORERS) * 2 * 3 == 58
    assert len({s.hash for s in full}) == len({s.label for s in full}) == 58
    assert sum(s.policy == "ams" for s in full) == sum(s.policy == "topk" for s in full) == 27
    assert {s.scorer for s in full if s.policy == "topk"} == set(SCORERS)
    for spec in full:                                     # every configuration is valid for a 256-token basis
        cfg = spec.config(256)
        assert cfg.policy == spec.policy
        if spec.policy != "none":
            assert cfg.budget == max(21, round(spec.budget * 256)) and cfg.interval == max(8, cfg.budget // 4)
    assert H.PolicySpec("topk", "h2o", 0.1).config(100).budget == 21          # floor: sink + keep_lastn + 1
    abl = H.ablation_sweep(0.25)
    assert len(abl) == 3 and {s.config(256).segmenter for s in abl} == {"equal_mass", "fixed_length"}
    assert [s.config(256).use_credit for s in abl] == [True, False, True]
    assert [s.config(256).use_mass for s in abl] == [True, True, False]
    picked = H.select_sweep(["topk", "ams", "none"], ["snapkv"], [0.25])
    assert [s.label for s in picked] == ["topk/snapkv@0.25", "ams/snapkv@0.25", "full KV"]
    assert len(H.select_sweep(["none", "streaming", "topk"], ["snapkv", "tova"], [0.1, 0.5], ablations=True)) \
        == 1 + 2 + 4 + 6
    # The hash ignores what a policy does not use and changes with what it does.
    assert H.PolicySpec("none", "tova", 0.1).hash == H.PolicySpec("none").hash
    assert H.PolicySpec("streaming", "tova", 0.1).hash == H.PolicySpec("streaming", "snapkv", 0.1).hash
    assert H.PolicySpec("ams", "tova", 0.1).hash != H.PolicySpec("ams", "tova", 0.1, (("qmin", 4),)).hash
    args = run.build_parser().parse_args(["--sweep", "full", "--scorers", "all", "--budgets", "0.1,0.25,0.5",
                                          "--ablations", "--ablation-budget", "0.25"])
    assert len(run.specs_from_args(args)) == 58 + 3 * len(SCORERS)


# ------------------------------------------------------------------------------------------------------------------
# Server path: request payloads

def _example(prompt=(1, 2, 3), forced=(9, 9), new=32):
    return T.Example("needle", "x", list(prompt), list(forced), "1", new, 100)


def test_server_payloads():
    server = B.server_config("ams", "snapkv")
    backend = B.ServerBackend("http://h:1/", "m", None, {7, 2}, server)
    cfg = H.PolicySpec("topk", "h2o", 0.25).config(256)
    body = backend.payload(_example(), cfg)
    assert body["input_ids"] == [1, 2, 3, 9, 9]                 # forced answer start goes into the prompt
    params = body["sampling_params"]
    assert params["temperature"] == 0.0 and params["max_new_tokens"] == 32 and params["stop_token_ids"] == [2, 7]
    assert params["custom_params"] == {"kv_policy": {"policy": "topk", "budget": 64, "interval": 16,
                                                     "scorer": "h2o"}}
    assert request_override(server, params["custom_params"]["kv_policy"]) == cfg
    json.dumps(body)                                               # JSON-serialisable as is
    none = backend.payload(_example(), H.PolicySpec("none").config(256))
    assert none["sampling_params"]["custom_params"] == {"kv_policy": {"policy": "none"}}
    streaming = backend.payload(_example(), H.PolicySpec("streaming", "streaming", 0.5).config(256))
    assert streaming["sampling_params"]["custom_params"]["kv_policy"] == {"policy": "streaming", "budget": 128,
                                                                          "interval": 32, "scorer": "streaming"}
    # Ablation settings are server flags: refused with the flag to start the server with.
    with pytest.raises(ValueError, match="--ams-use-credit false"):
        backend.payload(_example(), H.ablation_sweep(0.25)[1].config(256))
    ablation_server = B.ServerBackend("http://h:1", "m", None, [], B.server_config(use_credit=False))
    assert ablation_server.payload(_example(), H.ablation_sweep(0.25)[1].config(256))
    # A server without a policy rejects overrides; a query-free server cannot run AMS.
    off = B.ServerBackend("http://h:1", "m", None, [], B.server_config("none"))
    assert "custom_params" not in off.payload(_example(), H.PolicySpec("none").config(256))["sampling_params"]
    with pytest.raises(ValueError, match="kv-policy none"):
        off.payload(_example(), cfg)
    query_free = B.ServerBackend("http://h:1", "m", None, [], B.server_config("topk", "keydiff"))
    assert query_free.payload(_example(), H.PolicySpec("topk", "random", 0.25).config(256))
    with pytest.raises(ValueError, match="query ring"):
        query_free.payload(_example(), H.PolicySpec("ams", "snapkv", 0.25).config(256))


def test_server_payload_passes_the_plugin_and_resolves_to_the_same_config(monkeypatch):
    from sglang_ams.engine import request_state
    from sglang_ams.engine.settings import ENV_VAR, EngineSettings
    from sglang_ams.patches import sampling_params
    server = B.server_config("ams", "snapkv")
    monkeypatch.setenv(ENV_VAR, EngineSettings(policy=server).to_json())
    backend = B.ServerBackend("http://h:1", "m", None, [], server)
    for spec in H.full_sweep():
        cfg = spec.config(512)
        params = backend.payload(_example(), cfg)["sampling_params"]
        sampling_params.verify_hook(None, SimpleNamespace(custom_params=params["custom_params"]))
        req = SimpleNamespace(sampling_params=SimpleNamespace(custom_params=params["custom_params"]))
        state = request_state.state_of(req, server)
        assert (state is None) if spec.policy == "none" else (state.cfg == cfg), spec.label


def test_server_generate_posts_and_parses():
    calls = []

    def post(url, body, timeout):
        calls.append((url, body))
        return {"text": " 12345.", "meta_info": {"completion_tokens": 3, "finish_reason": {"type": "stop"},
                                                 "kv_compactions": 2, "prompt_tokens": 5}}
    backend = B.ServerBackend("http://h:1/", "m", None, [], B.server_config(), post=post)
    out = backend.generate(_example(), H.PolicySpec("ams", "snapkv", 0.25).config(256))
    assert calls[0][0] == "http://h:1/generate" and calls[0][1]["input_ids"] == [1, 2, 3, 9, 9]
    assert out["text"] == " 12345." and out["n_generated"] == 3 and out["server_meta"] == {"kv_compactions": 2}
    flags = B.launch_flags(B.server_config())
    assert flags[:2] == ["--kv-policy", "ams"] and "--ams-keep-lastn" in flags and "--ams-use-credit" in flags
    assert flags[flags.index("--ams-use-credit") + 1] == "true"


# ------------------------------------------------------------------------------------------------------------------
# The reference backend and resumable runs on the tiny model

def test_reference_backend_records_wipeout_and_jitter():
    backend = B.ReferenceBackend("tiny", model=tiny_llama(), tokenizer=byte_tokenizer())
    prompt = list(range(40, 140))
    ex = T.Example("gsm8k_cot", "0", prompt, [], "1", 48, 48)
    cfg = PolicyConfig(policy="ams", scorer="snapkv", budget=40, interval=8, window=8, sink=4, keep_lastn=8,
                       lmin=2, qmin=1, delta=0.2)
    out = backend.generate(ex, cfg)
    assert out["compactions"] >= 3 and out["peak_kv"] <= len(prompt) + 8
    wiped, total = out["wipeout_fixed32"]
    assert total > 0 and 0 <= wiped <= total
    assert out["jitter"][1] > 0 and out["segments_mean"] > 1
    topk = backend.generate(ex, cfg.replace(policy="topk"))
    assert "jitter" not in topk and topk["wipeout_fixed32"][1] > 0
    assert backend.generate(ex, PolicyConfig()).keys() == {"text", "n_generated", "compactions", "peak_kv",
                                                           "final_kv", "seconds"}


def test_resumable_run_skips_done_items_and_reports(tmp_path, monkeypatch):
    data = synthetic_data(tmp_path)
    calls = []

    class Counting(B.ReferenceBackend):
        def generate(self, example, cfg):
            calls.append((example.task, example.id, cfg.policy))
            return super().generate(example, cfg)

    model, tok = tiny_llama(), byte_tokenizer()
    monkeypatch.setattr(run, "make_backend", lambda a: Counting("tiny", model=model, tokenizer=tok))
    out = tmp_path / "out"

    def args(policies="none,topk,ams"):
        return ["--tasks", "gsm8k_cot,needle", "--limit", "2", "--max-new-tokens", "gsm8k_cot=24,needle=4",
                "--needle-lengths", "150", "--needle-depths", "0.5", "--budgets", "0.25", "--policies", policies,
                "--data", str(data), "--out", str(out), "--no-progress", "--model", "tiny"]
    argv = args()
    assert run.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(calls) == len(rows) == (2 + 1) * 3
    assert {(r["task"], r["policy"]) for r in rows} >= {("gsm8k_cot", "ams"), ("needle", "none")}
    assert all(r["compactions"] > 0 for r in rows if r["policy"] != "none")
    assert all(r["compactions"] == 0 for r in rows if r["policy"] == "none")

    calls.clear()
    assert run.main(argv) == 0                                   # everything done: nothing runs again
    assert calls == [] and len((out / "results.jsonl").read_text().splitlines()) == len(rows)

    # Drop one row and tear the last line (a run killed mid-write): only the missing item runs again.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:4] + lines[5:]) + "\n" + lines[4][:30])
    assert run.main(argv) == 0
    missing = json.loads(lines[4])
    assert calls == [(missing["task"], missing["example_id"], missing["policy"])]
    # A new policy adds only its own runs.
    calls.clear()
    assert run.main(args("none,topk,ams,streaming")) == 0
    assert len(calls) == 3 and {c[2] for c in calls} == {"streaming"}

    summary = json.loads((out / "summary.json").read_text())
    needle_ams = [a for a in summary["accuracy"] if a["task"] == "needle" and a["policy"] == "ams"][0]
    assert needle_ams["n"] == 1 and needle_ams["ci95"] == list(H.wilson(needle_ams["correct"], 1))
    assert len(summary["wipeout_pairs"]) == 2 and (out / "accuracy.png").is_file()
    md = (out / "report.md").read_text()
    assert "| ams/snapkv@0.25 |" in md and "region wipe-out rate" in md


def test_concurrent_server_runs_keep_every_row(tmp_path, monkeypatch):
    import threading
    data = synthetic_data(tmp_path)
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    class FakeServer:
        name, tokenizer = "server", byte_tokenizer()

        def generate(self, example, cfg):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.05)                      # long enough for the pool to have several requests in flight
            with lock:
                state["now"] -= 1
            return {"text": f" {example.gold}.", "n_generated": 3, "seconds": 0.05}

    monkeypatch.setattr(run, "make_backend", lambda a: FakeServer())
    out = tmp_path / "out"
    argv = ["--backend", "server", "--tasks", "gsm8k_cot,needle", "--limit", "2", "--max-new-tokens",
            "gsm8k_cot=24,needle=4", "--needle-lengths", "150", "--needle-depths", "0.5", "--budgets", "0.25",
            "--policies", "none,topk,ams", "--data", str(data), "--out", str(out), "--no-progress", "--model", "tiny"]
    assert run.main(argv + ["--concurrency", "4"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert state["peak"] > 1 and len(rows) == (2 + 1) * 3
    assert len({(r["task"], r["example_id"], r["policy_hash"]) for r in rows}) == len(rows)
    assert all(r["correct"] for r in rows)
    with pytest.raises(SystemExit, match="--concurrency"):
        run.main(argv[2:] + ["--concurrency", "2"])           # the reference backend runs one request at a time


def test_report_agreement_between_backends(tmp_path):
    def row(backend, ex, answer, correct, label="ams/snapkv@0.25", phash="h1"):
        return {"backend": backend, "model": "m", "task": "needle", "example_id": ex, "max_new_tokens": 12,
                "policy_hash": phash, "policy_label": label, "policy": "ams", "scorer": "snapkv",
                "budget_frac": 0.25, "overrides": {}, "extracted": answer, "correct": correct, "seconds": 1.0}
    rows = [row("reference", "a", "1", True), row("server", "a", "1", True),
            row("reference", "b", "2", True), row("server", "b", "3", False),
            row("reference", "c", "4", False),
            {**row("reference", "a", "1", True, "ams/snapkv@0.25[use_credit=False]", "h2"),
             "overrides": {"use_credit": False}, "jitter": [30.0, 10], "segments_mean": 5.0}]
    agree = report.agreement(rows)
    assert len(agree) == 1 and agree[0]["examples"] == 2 and agree[0]["same_answer"] == 1
    assert agree[0]["agreement"] == 0.5
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = report.make_report(tmp_path / "out", [path])
    assert "Agreement between the reference and server paths" in (tmp_path / "out" / "report.md").read_text()
    ref = [a for a in summary["accuracy"] if a["backend"] == "reference" and a["policy_hash"] == "h1"][0]
    assert (ref["n"], ref["correct"]) == (3, 2)
    assert [a["label"] for a in summary["ablations"]] == ["ams/snapkv@0.25", "ams/snapkv@0.25[use_credit=False]"]
    assert summary["ablations"][1]["jitter_tokens"] == 3.0 and summary["ablations"][1]["segments_mean"] == 5.0


def test_run_wide_overrides_are_no_ablation_and_pair_topk_with_ams():
    def row(policy, overrides, correct, ex="a"):
        label = f"{policy}/snapkv@0.25" + "".join(f"[{k}={v}]" for k, v in overrides.items())
        return {"backend": "server", "model": "m", "task": "needle", "example_id": ex, "max_new_tokens": 12,
                "policy_hash": label, "policy_label": label, "policy": policy, "scorer": "snapkv",
                "budget_frac": 0.25, "overrides": overrides, "extracted": "1", "correct": correct, "seconds": 1.0}
    delta = {"delta": 0.02}
    rows = [row("topk", delta, False), row("ams", delta, True), row("topk", {}, True),
            row("ams", {**delta, "use_mass": False}, False)]
    summary = report.summarize(rows)
    pairs = summary["wipeout_pairs"]
    assert [(p["ams_label"], p["topk_correct"], p["ams_correct"]) for p in pairs] == \
        [("ams/snapkv@0.25[delta=0.02]", 0, 1)]            # same overrides chosen over the plain top-k row
    assert [a["label"] for a in summary["ablations"] if a["policy"] == "ams"] == \
        ["ams/snapkv@0.25[delta=0.02]", "ams/snapkv@0.25[delta=0.02][use_mass=False]"]


def test_report_reads_an_archived_gzip_results_file(tmp_path):
    import gzip
    row = {"backend": "server", "model": "m", "task": "needle", "example_id": "a", "max_new_tokens": 12,
           "policy_hash": "h", "policy_label": "full KV", "policy": "none", "scorer": None, "budget_frac": None,
           "overrides": {}, "extracted": "1", "correct": True, "seconds": 1.0}
    with gzip.open(tmp_path / "results.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(row) + "\n" + json.dumps(row)[:20])          # a torn last line is skipped too
    assert H.results_file(tmp_path).name == "results.jsonl.gz"
    summary = report.make_report(tmp_path)
    assert [(a["label"], a["n"]) for a in summary["accuracy"]] == [("full KV", 1)]
    with pytest.raises(SystemExit, match="gunzip"):
        run.main(["--out", str(tmp_path), "--tasks", "needle", "--model", "tiny"])


def test_needle_survival_counts_heads_and_tokens():
    import needle_survival as NS
    # 1 layer, 2 heads, 3 kept positions each; needle = positions [4, 7)
    kept = torch.tensor([[[0, 4, 6], [1, 2, 9]]])
    per_token, blind = NS.survival(kept, 4, 7)
    assert per_token == [0.5, 0.0, 0.5] and blind == 0.5


def test_needle_region_kept_fractions():
    import needle_survival as NS
    kept = torch.tensor([[[0, 4, 6], [1, 2, 9]]])      # 2 heads; region [0, 4) holds 1 + 2 kept of 8 entries
    assert NS.region_kept(kept, {"a": (0, 4), "b": (8, 10), "empty": (5, 5)}) == {"a": 3 / 8, "b": 1 / 4}
