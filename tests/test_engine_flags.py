"""Flags, Engine kwargs, startup refusals and per-request validation, against real SGLang on CPU (CI runs these on
0.5.17 and again on 0.5.23)."""
import os
import subprocess
import sys

import pytest

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.settings import ENV_VAR, EngineSettings

sglang = pytest.importorskip("sglang.srt.server_args")
pytestmark = pytest.mark.sglang_api


@pytest.fixture(scope="module")
def plugins():
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.plugins.hook_registry import HookRegistry
    return HookRegistry


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield
    os.environ.pop(ENV_VAR, None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig
    path = tmp_path_factory.mktemp("tiny")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return str(path)


def _cli(model, *flags):
    from sglang.srt.server_args import prepare_server_args
    return prepare_server_args(["--model-path", model, "--device", "cpu", *flags])


def test_flag_hooks_apply(plugins):
    from sglang_ams.patches import flag_hooks, missing_hooks
    assert missing_hooks(flag_hooks()) == []


def test_cli_flags_reach_server_args_and_force_flashinfer(plugins, clean_env, tiny_model):
    sa = _cli(tiny_model, "--kv-policy", "ams", "--kv-budget", "512", "--kv-scorer", "tova", "--ams-delta", "0.01",
              "--ams-use-credit", "false", "--ams-prompt-cache", "cached")
    st = sa._ams_settings
    assert (st.policy.policy, st.policy.budget, st.policy.scorer, st.policy.delta) == ("ams", 512, "tova", 0.01)
    assert st.policy.use_credit is False and st.prompt_cache == "cached"
    assert sa.attention_backend == "flashinfer"
    assert EngineSettings.from_json(os.environ[ENV_VAR]) == st


def test_policy_none_is_untouched(plugins, clean_env, tiny_model):
    """--kv-policy none resolves exactly the ServerArgs that SGLang alone resolves."""
    from sglang.srt.server_args import ServerArgs
    plain = _cli(tiny_model, "--random-seed", "7")
    assert plain._ams_settings.policy.policy == "none"
    assert ENV_VAR not in os.environ
    upstream = ServerArgs.from_cli_args.__wrapped__(ServerArgs, _namespace(tiny_model, "--random-seed", "7"))
    fields = compat.server_args_fields(ServerArgs)
    assert {f: getattr(plain, f) for f in fields} == {f: getattr(upstream, f) for f in fields}


def _namespace(model, *flags):
    """Parse with upstream's parser only (no plugin flags)."""
    import argparse
    from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args.__wrapped__(parser)
    return parser.parse_args(["--model-path", model, "--device", "cpu", *flags])


@pytest.mark.parametrize("flags,needle", [
    (["--kv-policy", "ams", "--kv-budget", "10"], "kv_budget (--kv-budget) = 10 is invalid: an integer >= 37"),
    (["--kv-policy", "ams", "--ams-lmin", "64", "--ams-lmax", "32"], "ams_lmax (--ams-lmax) = 32"),
    (["--kv-policy", "ams", "--ams-delta", "2"], "ams_delta (--ams-delta) = 2.0 is invalid: a number in (0.0, 1.0]"),
    (["--kv-policy", "ams", "--enable-mixed-chunk"], "cannot be combined with --enable-mixed-chunk"),
    (["--kv-policy", "ams", "--attention-backend", "triton"], "cannot be combined with --attention-backend='triton'"),
    (["--kv-policy", "topk", "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype='fp8_e4m3'"),
    (["--kv-policy", "ams", "--speculative-algorithm", "EAGLE"], "--speculative-algorithm"),
    (["--kv-policy", "ams", "--tp-size", "2"], "cannot be combined with --tp-size=2"),
    (["--kv-policy", "topk", "--dp-size", "2"], "cannot be combined with --dp-size=2"),
    (["--kv-policy", "ams", "--ams-batch-slack", "1.0"], "ams_batch_slack (--ams-batch-slack) = 1.0 is invalid: a number in [0, 1)"),
])
def test_bad_flags_exit_with_clear_message(plugins, clean_env, tiny_model, flags, needle):
    with pytest.raises(SystemExit) as err:
        _cli(tiny_model, *flags)
    assert needle in str(err.value), str(err.value)


def test_unknown_scorer_is_rejected_by_argparse(tiny_model):
    code = ("from sglang.srt.plugins import load_plugins; load_plugins();"
            "from sglang.srt.server_args import prepare_server_args;"
            f"prepare_server_args(['--model-path', {tiny_model!r}, '--kv-policy', 'ams', '--kv-scorer', 'magic'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 2 and "--kv-scorer: invalid choice: 'magic'" in out.stderr


def test_engine_flags_reach_settings(plugins, clean_env, tiny_model):
    sa = _cli(tiny_model, "--kv-policy", "ams", "--ams-scoring-lse", "recompute", "--ams-batch-slack", "0.25")
    st = sa._ams_settings
    assert st.scoring_lse == "recompute" and st.batch_slack == 0.25 and st.slack_tokens(512) == 128
    assert EngineSettings().slack_tokens(1) == 0      # never a whole interval: compaction always frees tokens


def test_help_lists_flags_with_defaults(tiny_model):
    code = ("from sglang.srt.plugins import load_plugins; load_plugins();"
            "from sglang.srt.server_args import prepare_server_args; prepare_server_args(['--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    text = " ".join(out.stdout.split())
    for needle in ("--kv-policy {none,topk,ams,streaming}", "--kv-budget", "(default: 1024)", "--ams-delta",
                   "(default: 0.02)", "--ams-prompt-cache {private,cached}"):
        assert needle in text, needle


class Launched(Exception):
    def __init__(self, server_args):
        self.server_args = server_args


@pytest.fixture
def engine(monkeypatch):
    """sglang.Engine(**kwargs) up to the point where it would launch its processes: returns its ServerArgs."""
    import atexit

    from sglang.srt.entrypoints.engine import Engine

    def launch(*args, **kwargs):
        raise Launched(kwargs["server_args"])
    monkeypatch.setattr(Engine, "_launch_subprocesses", launch)
    monkeypatch.setattr(atexit, "register", lambda *a, **k: None)

    def build(**kwargs):
        with pytest.raises(Launched) as got:
            Engine(**kwargs)
        return got.value.server_args
    return build


def test_engine_kwargs(plugins, clean_env, tiny_model, engine):
    sa = engine(model_path=tiny_model, device="cpu", kv_policy="streaming", kv_budget=300, ams_sink=8)
    assert sa._ams_settings.policy == PolicyConfig(policy="streaming", budget=300, sink=8)
    assert sa.attention_backend == "flashinfer"
    assert EngineSettings.from_json(os.environ[ENV_VAR]) == sa._ams_settings
    with pytest.raises(ValueError, match=r"kv_interval \(--kv-interval\) = 0"):
        engine(model_path=tiny_model, device="cpu", kv_policy="ams", kv_interval=0)
    # a later Engine without our kwargs must not inherit the policy through the environment
    engine(model_path=tiny_model, device="cpu")
    assert ENV_VAR not in os.environ


def test_first_engine_call_takes_our_kwargs(tiny_model):
    """The plugin is loaded inside the first Engine.__init__ of a process: that call's kwargs work too."""
    code = ("import atexit, os; atexit.register = lambda *a, **k: None\n"
            "from sglang.srt.entrypoints.engine import Engine\n"
            "class Launched(Exception): pass\n"
            "def launch(*a, **k): raise Launched(k['server_args'])\n"
            "Engine._launch_subprocesses = launch\n"
            "try:\n"
            f"    Engine(model_path={tiny_model!r}, device='cpu', kv_policy='ams', kv_budget=256)\n"
            "except Launched as got:\n"
            "    sa = got.args[0]\n"
            "    print('OK', sa._ams_settings.policy.budget, sa.attention_backend, 'AMS_KV_CONFIG' in os.environ)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip().splitlines()[-1:] == ["OK 256 flashinfer True"], out.stderr[-3000:]


def test_settings_survive_pickling(plugins, clean_env, tiny_model):
    import pickle
    sa = _cli(tiny_model, "--kv-policy", "ams", "--kv-budget", "700")
    assert pickle.loads(pickle.dumps(sa))._ams_settings.policy.budget == 700


def _verify(custom, monkeypatch, server=EngineSettings(policy=PolicyConfig(policy="ams"))):
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang_ams.patches.sampling_params import verify_hook
    ams_settings.publish(server)
    sp = SamplingParams(max_new_tokens=8, custom_params=custom)
    return verify_hook(None, sp, 1000)


def test_request_override_validation(clean_env, monkeypatch):
    assert _verify({"kv_policy": {"budget": 256}}, monkeypatch) is None
    assert _verify({"other": 1}, monkeypatch) is None
    with pytest.raises(ValueError, match=r"custom_params.kv_policy: kv_budget \(--kv-budget\) = 8"):
        _verify({"kv_policy": {"budget": 8}}, monkeypatch)
    with pytest.raises(ValueError, match="a key among policy, budget, interval, scorer"):
        _verify({"kv_policy": {"window": 3}}, monkeypatch)
    assert _verify({"kv_policy": "ams"}, monkeypatch, server=EngineSettings()) is None    # policy off: upstream
    with pytest.raises(ValueError, match="needs window queries"):
        _verify({"kv_policy": {"policy": "ams"}}, monkeypatch,
                server=EngineSettings(policy=PolicyConfig(policy="topk", scorer="keydiff")))


def test_engine_hooks_all_resolve_in_a_policy_process(tmp_path):
    env = dict(os.environ, **{ENV_VAR: EngineSettings(policy=PolicyConfig(policy="ams")).to_json()})
    code = ("from sglang.srt.plugins import load_plugins; load_plugins();"
            "from sglang_ams.patches import missing_hooks, wanted_hooks;"
            "print(len(wanted_hooks()), missing_hooks())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    n, missing = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(n) >= 20 and missing == "[]"


def test_verify_applied_names_missing_hooks():
    from sglang_ams.patches import verify_applied
    with pytest.raises(RuntimeError, match="failed to apply.*no.such.Target"):
        verify_applied([("no.such.Target.fn", None, "after")], "test")


def test_decode_graph_limit_is_read_from_real_server_args(plugins, clean_env, tiny_model):
    from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig, PhaseConfig

    from sglang_ams.patches.scheduler import decode_graph_max_bs, graph_hint
    sa = _cli(tiny_model, "--kv-policy", "ams")
    decode_graph_max_bs(sa)                 # on a CPU device SGLang turns decode graphs off (or leaves no config)

    def decode_graphs(backend, max_bs):     # as a GPU server has them (0.5.17 resolves the config read-only)
        if sa.cuda_graph_config is None:
            sa.cuda_graph_config = CudaGraphConfig(decode=PhaseConfig())
        sa.cuda_graph_config.decode.backend, sa.cuda_graph_config.decode.max_bs = backend, max_bs
    decode_graphs("disabled", 384)
    assert decode_graph_max_bs(sa) is None
    decode_graphs("full", 384)
    assert decode_graph_max_bs(sa) == 384
    hint = graph_hint(1024, decode_graph_max_bs(sa))
    assert "batch 384" in hint and "--cuda-graph-max-bs-decode 512" in hint
    assert graph_hint(300, 384) is None and graph_hint(None, 384) is None and graph_hint(1024, None) is None
    assert "--cuda-graph-max-bs-decode 300" in graph_hint(300, 256)
    # the 2026-12-08 visit: graphs already at 512 with 4096 allowed to run, and the hint still advised 512
    assert graph_hint(4096, 512) is None and graph_hint(4096, 768) is None
