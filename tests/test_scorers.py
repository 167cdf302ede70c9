"""Scorers, RoPE helpers and TriAttention calibration against direct loop-based implementations of their formulas.

The references loop over request, layer, head, token and query with scalar/vector float64 ops; the fixtures use
GQA group sizes 1, 2 and 4, head_dim 8 and 16, neox and gptj RoPE (one partial), and two requests of different
lengths (the shorter one padded with garbage keys that must not leak into its scores).
"""
from __future__ import annotations

import cmath
import dataclasses
import math

import pytest
import torch

from sglang_ams.config import SCORERS, PolicyConfig
from sglang_ams.rope import RopeSpec, inv_freq_from_config, rope_from_hf_model, rotate, to_complex, unrotate
from sglang_ams.scorers.base import ScoreInputs
from sglang_ams.scorers.builtin import make_scorer
from sglang_ams.window_attention import window_attention

LAYERS, KV_HEADS, T, W = 2, 2, 13, 4
LENGTHS = (13, 9)
POS_OFFSET = (0, 37)          # logical − physical position (as after a compaction)
CASES = [  # (G, head_dim, rope style, rotated dims)
    (1, 8, "neox", 8),
    (2, 16, "gptj", 16),
    (4, 8, "neox", 8),
    (4, 16, "neox", 12),
]


def rope_spec(d_rot: int, style: str, theta: float = 10000.0) -> RopeSpec:
    return RopeSpec((1.0 / theta ** (torch.arange(0, d_rot, 2, dtype=torch.float64) / d_rot)).float(), style)


def pair_index(f: int, rope: RopeSpec) -> tuple[int, int]:
    half = rope.inv_freq.numel()
    return (f, f + half) if rope.style == "neox" else (2 * f, 2 * f + 1)


def rotation_matrix(position: float, rope: RopeSpec, d: int) -> torch.Tensor:
    """Explicit d x d RoPE matrix: 2x2 rotations on the frequency pairs, identity elsewhere."""
    r = torch.eye(d, dtype=torch.float64)
    for f in range(rope.inv_freq.numel()):
        i, j = pair_index(f, rope)
        a = position * float(rope.inv_freq[f])
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    return r


@dataclasses.dataclass
class Case:
    g: int
    d: int
    rope: RopeSpec
    inputs: ScoreInputs
    keys_pre: torch.Tensor        # float64 pre-RoPE keys the stored keys were made from
    queries_pre: torch.Tensor
    key_pos: torch.Tensor         # [N, T] logical positions
    probs: torch.Tensor           # loop reference of window attention [N, L, Hq, W, T]

    @property
    def hq(self):
        return KV_HEADS * self.g


def ref_window_probs(inputs: ScoreInputs, g: int) -> torch.Tensor:
    keys, queries = inputs.keys.double(), inputs.queries.double()
    n_req, hq = keys.shape[0], queries.shape[2]
    scale = keys.shape[-1] ** -0.5
    probs = torch.zeros(n_req, LAYERS, hq, W, T, dtype=torch.float64)
    for n in range(n_req):
        length = LENGTHS[n]
        for l in range(LAYERS):
            for qh in range(hq):
                for w in range(W):
                    last = length - W + w                  # the query's own key index: it sees keys 0..last
                    q = queries[n, l, qh, w]
                    logits = torch.stack([q.dot(keys[n, l, qh // g, t]) * scale for t in range(last + 1)])
                    e = (logits - logits.max()).exp()
                    probs[n, l, qh, w, :last + 1] = e / e.sum()
    return probs


def build_case(g: int, d: int, style: str, d_rot: int) -> Case:
    gen = torch.Generator().manual_seed(1000 + 10 * g + d)
    n_req, hq = len(LENGTHS), KV_HEADS * g
    rope = rope_spec(d_rot, style)
    # A shared direction in about half the keys gives cosine similarities above R-KV's 0.5 threshold.
    base = torch.randn(1, LAYERS, KV_HEADS, 1, d, generator=gen, dtype=torch.float64)
    shared = (torch.rand(n_req, LAYERS, KV_HEADS, T, 1, generator=gen) < 0.5).double() * 1.5
    keys_pre = torch.randn(n_req, LAYERS, KV_HEADS, T, d, generator=gen, dtype=torch.float64) + shared * base
    queries_pre = 1.5 * torch.randn(n_req, LAYERS, hq, W, d, generator=gen, dtype=torch.float64)
    values = torch.randn(n_req, LAYERS, KV_HEADS, T, d, generator=gen, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    offset = torch.tensor(POS_OFFSET)
    key_pos = torch.arange(T)[None, :] + offset[:, None]
    query_pos = lengths[:, None] - W + torch.arange(W)[None, :] + offset[:, None]
    keys = rotate(keys_pre, key_pos[:, None, None, :], rope)
    queries = rotate(queries_pre, query_pos[:, None, None, :], rope)
    inputs = ScoreInputs(keys=keys.float(), values=values.float(), lengths=lengths, queries=queries.float(),
                         query_pos=query_pos, rope=rope)
    return Case(g, d, rope, inputs, keys_pre, queries_pre, key_pos, ref_window_probs(inputs, g))


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"G{c[0]}-d{c[1]}-{c[2]}{c[3]}")
def case(request) -> Case:
    return build_case(*request.param)


def fresh(inputs: ScoreInputs, **changes) -> ScoreInputs:
    """A copy without the cached window attention (each scorer computes its own)."""
    return dataclasses.replace(inputs, **{"attn": None, **changes})


def run(name: str, case: Case, **cfg) -> torch.Tensor:
    scorer = make_scorer(PolicyConfig(scorer=name, **cfg))
    out = scorer.score(fresh(case.inputs))
    assert out.shape == (len(LENGTHS), LAYERS, KV_HEADS, T) and out.dtype == torch.float32
    return out


def assert_valid_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-4, atol=1e-5):
    for n, length in enumerate(LENGTHS):
        torch.testing.assert_close(actual[n, ..., :length].double(), expected[n, ..., :length].double(),
                                   rtol=rtol, atol=atol)


def softmax_list(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------- window attention


def test_window_attention_matches_loop_softmax(case):
    attn = window_attention(case.inputs.keys, case.inputs.queries, case.inputs.lengths)
    torch.testing.assert_close(attn.mean_rows.double(), case.probs.mean(dim=3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.last_row.double(), case.probs[:, :, :, -1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- attention-based scorers


def test_tova(case):
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n, length in enumerate(LENGTHS):
        for l in range(LAYERS):
            for t in range(length):
                shared = sum(float(case.probs[n, l, qh, W - 1, t]) for qh in range(case.hq)) / case.hq
                for h in range(KV_HEADS):
                    ref[n, l, h, t] = shared
    assert_valid_close(run("tova", case), ref)


@pytest.mark.parametrize("kernel", [1, 5])
def test_snapkv(case, kernel):
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n, length in enumerate(LENGTHS):
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                for t in range(length):
                    total = 0.0
                    for qh in range(h * case.g, (h + 1) * case.g):
                        row = [float(case.probs[n, l, qh, :, u].mean()) for u in range(T)]
                        window = [row[u] for u in range(t - kernel // 2, t + kernel // 2 + 1) if 0 <= u < T]
                        total += sum(window) / kernel          # zero padding counts in the mean
                    ref[n, l, h, t] = total / case.g
    assert_valid_close(run("snapkv", case, pool_kernel=kernel), ref)


def test_h2o(case):
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n, length in enumerate(LENGTHS):
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                for t in range(length):
                    total = 0.0
                    for qh in range(h * case.g, (h + 1) * case.g):
                        seeing = [w for w in range(W) if t <= length - W + w]
                        total += sum(float(case.probs[n, l, qh, w, t]) for w in seeing) / len(seeing)
                    ref[n, l, h, t] = total / case.g
    assert_valid_close(run("h2o", case), ref)


def test_h2o_newest_tokens_not_penalised_by_fewer_queries(case):
    # The newest token is seen by one query only: its score is that query's attention, not a W-th of it.
    out = run("h2o", case)
    n, length = 1, LENGTHS[1]
    expected = case.probs[n, :, :, W - 1, length - 1].reshape(LAYERS, KV_HEADS, case.g).mean(-1)
    torch.testing.assert_close(out[n, :, :, length - 1].double(), expected, rtol=1e-4, atol=1e-6)


def test_rkv(case):
    lam, threshold = 0.1, 0.5
    keys = case.inputs.keys.double()
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    exemptions = 0
    for n, length in enumerate(LENGTHS):
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                sim = [[0.0] * length for _ in range(length)]
                for i in range(length):
                    for j in range(length):
                        if i != j:
                            a, b = keys[n, l, h, i], keys[n, l, h, j]
                            sim[i][j] = float(a.dot(b) / (a.norm() * b.norm()))
                    similar = [j for j in range(length) if sim[i][j] > threshold]
                    if similar:
                        sim[i][max(similar)] = 0.0
                        exemptions += 1
                red = softmax_list([sum(sim[i][j] for i in range(length)) / length for j in range(length)])
                for t in range(length):
                    imp = -math.inf
                    for qh in range(h * case.g, (h + 1) * case.g):
                        row = [float(case.probs[n, l, qh, :, u].mean()) for u in range(T)]
                        imp = max(imp, max(row[u] for u in range(t - 3, t + 4) if 0 <= u < T))
                    ref[n, l, h, t] = lam * imp - (1 - lam) * red[t]
    assert exemptions > 0, "fixture should exercise the exemption"
    assert_valid_close(run("rkv", case), ref)


def test_rkv_tiling_does_not_change_scores(case):
    whole = run("rkv", case)
    scorer = make_scorer(PolicyConfig(scorer="rkv"))
    scorer.max_tile_bytes = scorer._bytes_per_entry * T * 3        # 3 rows of one head per tile
    torch.testing.assert_close(scorer.score(fresh(case.inputs)), whole, rtol=1e-6, atol=1e-7)


def test_precomputed_attention_is_used(case):
    # In the engine a kernel supplies WindowAttention; the scorers must read it instead of recomputing.
    inputs = fresh(case.inputs)
    attn = inputs.window_attention()
    doubled = dataclasses.replace(attn, mean_rows=attn.mean_rows * 2, last_row=attn.last_row * 2)
    for name in ("tova", "snapkv", "h2o"):
        base = make_scorer(PolicyConfig(scorer=name)).score(fresh(case.inputs))
        # h2o still needs the window size, which query_pos gives without the queries.
        scaled = make_scorer(PolicyConfig(scorer=name)).score(fresh(case.inputs, queries=None, attn=doubled))
        assert_valid_close(scaled, 2 * base)


# ---------------------------------------------------------------- query-free scorers


def test_streaming(case):
    ref = torch.arange(T, dtype=torch.float64).expand(len(LENGTHS), LAYERS, KV_HEADS, T)
    out = make_scorer(PolicyConfig(scorer="streaming")).score(fresh(case.inputs, queries=None))
    assert_valid_close(out, ref)


def test_keydiff(case):
    keys = case.inputs.keys.double()
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n, length in enumerate(LENGTHS):
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                anchor = sum(keys[n, l, h, t] / keys[n, l, h, t].norm() for t in range(length)) / length
                for t in range(length):
                    k = keys[n, l, h, t]
                    ref[n, l, h, t] = -k.dot(anchor) / (k.norm() * anchor.norm())
    out = make_scorer(PolicyConfig(scorer="keydiff")).score(fresh(case.inputs, queries=None))
    assert_valid_close(out, ref)


def ref_mix(x: int) -> int:
    """The random scorer's integer mixer, on Python ints (31-bit xor-shift-multiply, two rounds)."""
    for _ in range(2):
        x ^= x >> 16
        x = (x * 0x45D9F3B) % (1 << 31)
    return x ^ (x >> 16)


def test_random_is_seeded_and_uniform(case):
    """Score of (request n, layer l, KV head h, token t) in the call drawing base b: the mixer chained over
    b + n, l, h, t (model-wide layer and head ids), scaled to [0, 1); b is the call's draw from the seeded host
    generator."""
    scorer = make_scorer(PolicyConfig(scorer="random", seed=7))
    out = scorer.score(fresh(case.inputs, queries=None))
    base = int(torch.randint(0, 1 << 31, (1,), generator=torch.Generator().manual_seed(7)))
    expected = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n in range(len(LENGTHS)):
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                for t in range(T):
                    x = ref_mix(ref_mix(ref_mix(ref_mix((base + n) % (1 << 31)) ^ l) ^ h) ^ t)
                    expected[n, l, h, t] = float(torch.tensor(x).float()) * 2.0 ** -31
    assert_valid_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(scorer.score(fresh(case.inputs)), out)          # the next call draws a new base
    again = make_scorer(PolicyConfig(scorer="random", seed=7)).score(fresh(case.inputs))
    other = make_scorer(PolicyConfig(scorer="random", seed=8)).score(fresh(case.inputs))
    assert torch.equal(out, again) and not torch.equal(out, other)
    layer1 = make_scorer(PolicyConfig(scorer="random", seed=7)).score(fresh(case.inputs, layer_start=1))
    assert torch.equal(layer1[:, 0], out[:, 1])          # scores follow the model layer, not the chunk's index


# ---------------------------------------------------------------- expected attention


def test_expected_attention(case):
    d, s, n_future, eps = case.d, case.d ** -0.5, 512, 1e-2
    keys, values = case.inputs.keys.double(), case.inputs.values.double()
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n, length in enumerate(LENGTHS):
        p_now = int(case.inputs.query_pos[n, -1])
        mean_rot = sum(rotation_matrix(p_now + k, case.rope, d) for k in range(1, n_future + 1)) / n_future
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                probs = [0.0] * length
                for qh in range(h * case.g, (h + 1) * case.g):
                    qs = [case.queries_pre[n, l, qh, w] for w in range(W)]
                    mu = sum(qs) / W
                    sigma = sum(torch.outer(q - mu, q - mu) for q in qs) / W
                    mu_f, sigma_f = mean_rot @ mu, mean_rot @ sigma @ mean_rot.T
                    logits = [float(s * keys[n, l, h, t].dot(mu_f) +
                                    s * s / 2 * keys[n, l, h, t] @ sigma_f @ keys[n, l, h, t])
                              for t in range(length)]
                    for t, p in enumerate(softmax_list(logits)):
                        probs[t] += p / case.g
                for t in range(length):
                    ref[n, l, h, t] = (probs[t] + eps) * values[n, l, h, t].norm()
    assert_valid_close(run("expected_attention", case), ref)


# ---------------------------------------------------------------- triattention


def window_query_stats(case: Case):
    """Per (request, layer, q head, f): E[q_f] and E|q_f| of the window's pre-RoPE queries."""
    stats = {}
    for n in range(len(LENGTHS)):
        for l in range(LAYERS):
            for qh in range(case.hq):
                for f in range(case.rope.inv_freq.numel()):
                    i, j = pair_index(f, case.rope)
                    zs = [complex(float(case.queries_pre[n, l, qh, w, i]), float(case.queries_pre[n, l, qh, w, j]))
                          for w in range(W)]
                    stats[n, l, qh, f] = (sum(zs) / W, sum(abs(z) for z in zs) / W)
    return stats


def ref_triattention(case: Case, stats) -> torch.Tensor:
    """The paper's form on pre-RoPE keys with explicit distances: |E q||k| cos(ω(Δ+δ)+φ) + (E|q| − |E q|)|k|."""
    offsets = [2 ** e for e in range(17)]
    n_freq = case.rope.inv_freq.numel()
    ref = torch.zeros(len(LENGTHS), LAYERS, KV_HEADS, T, dtype=torch.float64)
    for n, length in enumerate(LENGTHS):
        p_now = int(case.inputs.query_pos[n, -1])
        for l in range(LAYERS):
            for h in range(KV_HEADS):
                best = [-math.inf] * length
                for qh in range(h * case.g, (h + 1) * case.g):
                    raw = []
                    for t in range(length):
                        delta = p_now - int(case.key_pos[n, t])
                        total = 0.0
                        for f in range(n_freq):
                            i, j = pair_index(f, case.rope)
                            k = complex(float(case.keys_pre[n, l, h, t, i]), float(case.keys_pre[n, l, h, t, j]))
                            q_mean, q_abs = stats[n, l, qh, f]
                            omega = float(case.rope.inv_freq[f])
                            phi = cmath.phase(q_mean) - cmath.phase(k)
                            for off in offsets:
                                total += abs(q_mean) * abs(k) * math.cos(omega * (delta + off) + phi) / len(offsets)
                            total += (q_abs - abs(q_mean)) * abs(k)
                        raw.append(total)
                    mean = sum(raw) / length
                    std = math.sqrt(sum((r - mean) ** 2 for r in raw) / length)
                    best = [max(b, (r - mean) / (std + 1e-6)) for b, r in zip(best, raw)]
                for t in range(length):
                    ref[n, l, h, t] = best[t]
    return ref


def test_triattention_window_statistics(case):
    assert_valid_close(run("triattention", case), ref_triattention(case, window_query_stats(case)),
                       rtol=1e-3, atol=1e-3)


def test_triattention_calibrated_statistics(case, tmp_path):
    from sglang_ams.scorers.triattention_calib import TriAttentionStats, save_stats
    gen = torch.Generator().manual_seed(5)
    n_freq = case.rope.inv_freq.numel()
    q_mean = torch.complex(torch.randn(LAYERS, case.hq, n_freq, generator=gen),
                           torch.randn(LAYERS, case.hq, n_freq, generator=gen))
    q_abs = q_mean.abs() + torch.rand(LAYERS, case.hq, n_freq, generator=gen)
    path = str(tmp_path / "stats.pt")
    save_stats(TriAttentionStats(q_mean, q_abs, num_tokens=100, style=case.rope.style), path)
    stats = {(n, l, qh, f): (complex(q_mean[l, qh, f]), float(q_abs[l, qh, f]))
             for n in range(len(LENGTHS)) for l in range(LAYERS) for qh in range(case.hq) for f in range(n_freq)}
    scorer = make_scorer(PolicyConfig(scorer="triattention", triattention_stats=path))
    assert not scorer.needs.reads_window and scorer.needs.positions
    out = scorer.score(fresh(case.inputs, queries=None))           # stats from the file: no queries needed
    assert_valid_close(out, ref_triattention(case, stats), rtol=1e-3, atol=1e-3)


def test_triattention_rejects_mismatched_stats(case, tmp_path):
    from sglang_ams.scorers.triattention_calib import TriAttentionStats, save_stats
    n_freq = case.rope.inv_freq.numel()
    path = str(tmp_path / "stats.pt")
    save_stats(TriAttentionStats(torch.ones(LAYERS + 1, case.hq, n_freq, dtype=torch.complex64),
                                 torch.ones(LAYERS + 1, case.hq, n_freq), 1, case.rope.style), path)
    with pytest.raises(ValueError, match="layers"):
        make_scorer(PolicyConfig(scorer="triattention", triattention_stats=path)).score(fresh(case.inputs))


# ---------------------------------------------------------------- registry and errors


@pytest.mark.parametrize("name", SCORERS)
def test_make_scorer_every_name(case, name):
    scorer = make_scorer(PolicyConfig(scorer=name))
    assert scorer.name == name
    out = scorer.score(fresh(case.inputs))
    assert out.shape == (len(LENGTHS), LAYERS, KV_HEADS, T) and out.dtype == torch.float32
    assert torch.isfinite(out).all(), name


def test_h2o_over_the_window_is_snapkv_without_pooling_but_for_the_newest(case):
    """What h2o's docstring and the README say: with only W queries, H2O is SnapKV at pool_kernel 1, except the
    newest W - 1 tokens (seen by fewer queries)."""
    h2o, snapkv = run("h2o", case), run("snapkv", case, pool_kernel=1)
    for n, length in enumerate(LENGTHS):
        old = length - W + 1
        torch.testing.assert_close(h2o[n, ..., :old], snapkv[n, ..., :old])
        assert not torch.allclose(h2o[n, ..., old:length], snapkv[n, ..., old:length])


@pytest.mark.parametrize("name", SCORERS)
def test_scorer_reads_only_what_it_declares(case, name):
    """Given only its declared inputs, as the compactor builds them (undeclared K/V replaced by noise, window
    attention precomputed as the engine's kernel does), a scorer scores exactly as with every input."""
    full = make_scorer(PolicyConfig(scorer=name)).score(fresh(case.inputs))
    need = make_scorer(PolicyConfig(scorer=name)).needs
    inp = case.inputs
    gen = torch.Generator().manual_seed(5)

    def noise(x):
        return 100 * torch.randn(x.shape, generator=gen)
    declared = ScoreInputs(
        keys=inp.keys if need.keys else noise(inp.keys), values=inp.values if need.values else noise(inp.values),
        lengths=inp.lengths, queries=inp.queries if need.reads_window else None,
        query_pos=inp.query_pos if need.reads_window or need.positions else None,
        rope=inp.rope if need.rope else None,
        attn=window_attention(inp.keys, inp.queries, inp.lengths) if need.runs_attention else None)
    assert_valid_close(make_scorer(PolicyConfig(scorer=name)).score(declared), full, rtol=1e-6, atol=1e-7)


def test_scorer_hyper_parameters_are_fields():
    """Constants are dataclass fields; the settings a user gives come from the PolicyConfig."""
    cfg = PolicyConfig(scorer="snapkv", pool_kernel=3, seed=9, triattention_stats="x.pt")
    assert make_scorer(cfg).pool_kernel == 3
    assert make_scorer(cfg, "random").seed == 9 and make_scorer(cfg, "triattention").stats == "x.pt"
    rkv = make_scorer(cfg, "rkv")
    assert (rkv.importance_weight, rkv.pool_kernel, rkv.fixed_bytes) == (0.1, 7, 3 * (256 << 20) // 2)
    assert make_scorer(cfg, "expected_attention").n_future == 512


def test_scorers_needing_queries_say_so():
    case = build_case(2, 8, "neox", 8)
    needing = [name for name in SCORERS if make_scorer(PolicyConfig(scorer=name)).needs.reads_window]
    assert set(needing) == {"tova", "snapkv", "h2o", "rkv", "expected_attention", "triattention"}
    for name in needing:
        with pytest.raises(ValueError, match=f"scorer '{name}' needs ScoreInputs.queries"):
            make_scorer(PolicyConfig(scorer=name)).score(fresh(case.inputs, queries=None))
    for name in set(SCORERS) - set(needing):
        make_scorer(PolicyConfig(scorer=name)).score(fresh(case.inputs, queries=None, query_pos=None, rope=None))
    with pytest.raises(ValueError, match="needs ScoreInputs.rope"):
        make_scorer(PolicyConfig(scorer="expected_attention")).score(fresh(case.inputs, rope=None))


# ---------------------------------------------------------------- RoPE helpers


@pytest.mark.parametrize("style,d,d_rot", [("neox", 16, 16), ("gptj", 16, 16), ("neox", 16, 8), ("gptj", 8, 4)])
def test_rotate_is_complex_multiplication_and_unrotate_inverts(style, d, d_rot):
    gen = torch.Generator().manual_seed(3)
    rope = rope_spec(d_rot, style)
    x = torch.randn(3, 5, d, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 4000, (3, 5), generator=gen)
    y = rotate(x, pos, rope)
    for a in range(3):
        for b in range(5):
            torch.testing.assert_close(y[a, b], rotation_matrix(int(pos[a, b]), rope, d) @ x[a, b])
    phase = torch.polar(torch.ones(3, 5, d_rot // 2, dtype=torch.float64), pos[..., None] * rope.inv_freq.double())
    torch.testing.assert_close(to_complex(y, rope), to_complex(x, rope) * phase)
    torch.testing.assert_close(y[..., d_rot:], x[..., d_rot:], rtol=0, atol=0)
    torch.testing.assert_close(unrotate(y, pos, rope), x)
    x32 = x.float()
    torch.testing.assert_close(unrotate(rotate(x32, pos, rope), pos, rope), x32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama3-scaled"])
def test_rotate_matches_transformers(family):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb as llama_apply
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb as qwen2_apply
    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen2":
        config = Qwen2Config(rope_theta=1_000_000.0, **sizes)
        rotary, apply = Qwen2RotaryEmbedding(config), qwen2_apply
    else:
        rope_parameters = {"rope_type": "default", "rope_theta": 500_000.0} if family == "llama" else {
            "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
        config = LlamaConfig(head_dim=16, max_position_embeddings=8192, rope_parameters=rope_parameters, **sizes)
        rotary, apply = LlamaRotaryEmbedding(config), llama_apply
    inv_freq = inv_freq_from_config(config)
    torch.testing.assert_close(inv_freq, rotary.inv_freq.float())
    rope = RopeSpec(inv_freq, "neox")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 7, 16, generator=gen)              # [B, heads, S, d]
    k = torch.randn(2, 2, 7, 16, generator=gen)
    position_ids = torch.randint(0, 3000, (2, 7), generator=gen)
    cos, sin = rotary(q, position_ids)
    q_hf, k_hf = apply(q, k, cos, sin)
    torch.testing.assert_close(rotate(q, position_ids[:, None, :], rope), q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(k, position_ids[:, None, :], rope), k_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unrotate(q_hf, position_ids[:, None, :], rope), q, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- TriAttention calibration


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def test_calibration_gathers_pre_rope_query_statistics(tmp_path):
    from sglang_ams.scorers.triattention_calib import gather_stats, load_stats, save_stats
    model = _tiny_llama()
    rope = rope_from_hf_model(model)
    torch.testing.assert_close(rope.inv_freq, inv_freq_from_config(model.config))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    stats = gather_stats(model, [{"input_ids": ids, "attention_mask": mask}])
    assert stats.shape == (2, 4, 8) and stats.num_tokens == 16

    # Reference: the attention input captured by a pre-hook, projected by q_proj by hand, summed with loops.
    captured = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: captured.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    for l, layer in enumerate(model.model.layers):
        with torch.no_grad():
            q = layer.self_attn.q_proj(captured[l]).double().view(2, 10, 4, 16)
        for h in range(4):
            for f in range(8):
                zs = [complex(float(q[b, s, h, f]), float(q[b, s, h, f + 8]))
                      for b in range(2) for s in range(10) if mask[b, s]]
                expect_mean, expect_abs = sum(zs) / len(zs), sum(abs(z) for z in zs) / len(zs)
                assert abs(complex(stats.q_mean[l, h, f]) - expect_mean) < 1e-5
                assert abs(float(stats.q_abs_mean[l, h, f]) - expect_abs) < 1e-5

    path = str(tmp_path / "calib.pt")
    save_stats(stats, path)
    loaded = load_stats(path, num_layers=2, num_q_heads=4, num_freqs=8)
    assert torch.equal(loaded.q_mean, stats.q_mean) and torch.equal(loaded.q_abs_mean, stats.q_abs_mean)
    assert loaded.num_tokens == 16 and loaded.style == "neox"
    with pytest.raises(ValueError, match="query heads"):
        load_stats(path, num_q_heads=8)
    torch.save({"q_mean": torch.zeros(2)}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="not a TriAttention stats file"):
        load_stats(str(tmp_path / "bad.pt"))
