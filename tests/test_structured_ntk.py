"""The structured (layer-factored) eNTK against the ``jacobian`` method and finite
differences, in float64: MLPs / dense nets, the embedded transformer with LoRA, a GPT-2 port."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.kernels import structured
from ntk_jax.kernels.ntk import empirical_ntk, ntk_fn
from ntk_jax.kernels.outputs import lm_output_fn
from ntk_jax.kernels.structured import structured_plan
from ntk_jax.models import gpt2
from ntk_jax.models.lora import LoRAConfig, apply_lora, lora_filter
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(autouse=True, scope="module")
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float64)


def mlp_problem():
    """tanh MLP with biases: weights are linear sites, biases fall back."""
    k = jax.random.split(jax.random.key(0), 8)
    params = {"w1": _normal(k[0], (5, 7), 0.5), "b1": _normal(k[1], (7,)),
              "w2": _normal(k[2], (7, 6), 0.4), "w3": _normal(k[3], (6, 3), 0.4)}

    def f(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.tanh(h @ p["w2"]) @ p["w3"]

    return f, params, _normal(k[4], (5, 5)), _normal(k[5], (4, 5))


def dense_problem():
    """Per-token dense layers over a sequence (T > 1 shared uses), a weight entering through
    reshape/transpose, a weight used twice (tied) and one used non-linearly."""
    k = jax.random.split(jax.random.key(1), 10)
    params = {"w_in": _normal(k[0], (4, 6), 0.5),           # x (n, T, 4) @ w_in: T = 3 per example
              "w_t": _normal(k[1], (3, 2, 6), 0.3),         # used as transpose(reshape(w_t)) : (6, 6)
              "tied": _normal(k[2], (6, 6), 0.3),           # used twice: fallback
              "gain": _normal(k[3], (6,), 0.5),             # elementwise: fallback
              "head": _normal(k[4], (6, 2), 0.5),           # (out, heads) via einsum "nth,hk->nk"
              "w_sq": _normal(k[5], (6, 6), 0.2)}           # used as w_sq * w_sq: fallback

    def f(p, x):
        h = jnp.einsum("ntd,de->nte", x, p["w_in"])
        w = jnp.transpose(p["w_t"].reshape(6, 6))
        h = jnp.tanh(h @ w)
        h = jnp.tanh(h @ p["tied"]) @ p["tied"] * p["gain"]
        h = h + jnp.sin(h @ (p["w_sq"] * p["w_sq"]))
        return jnp.einsum("nte,ek->nk", h, p["head"])

    return f, params, _normal(k[6], (4, 3, 4)), _normal(k[7], (3, 3, 4))


def transformer_problem():
    cfg = DecoderConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=24, dtype="float64", param_dtype="float64")
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj"), b_init_std=0.1), rngs=nnx.Rngs(1))
    subset = param_subset(model, lora_filter())
    return (lm_output_fn(subset), subset.params, _lm_batch(0, 3, 11), _lm_batch(1, 2, 11))


def gpt2_problem():
    """A tiny random GPT-2 port over ALL its parameters: projections are linear sites; layer
    norms, biases and the tied embedding fall back."""
    cfg = gpt2.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=12,
                          dtype="float64", param_dtype="float64", initializer_range=0.3)
    subset = param_subset(gpt2.GPT2LMHeadModel(cfg, rngs=nnx.Rngs(2)), nnx.Param)
    return lm_output_fn(subset), subset.params, _lm_batch(2, 3, 13), _lm_batch(3, 2, 13)


def _lm_batch(seed, n, vocab, T=5):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, T))
    mask[:, 2:] = 1.0
    return {"input_ids": jnp.asarray(rng.integers(0, vocab, (n, T)), jnp.int32),
            "attention_mask": jnp.ones((n, T), jnp.int32), "loss_mask": jnp.asarray(mask)}


def _kinds(plan):
    return {leaf.path: leaf.kind for leaf in plan.leaves}


def scaled_problem():
    """Standard-parameterisation style: weights scaled by scalars before their matmul
    (``x @ (W / √fan_in)``, ``(c * W)`` with c computed, a scaled and transposed weight); a
    weight scaled by a vector is not linear in one matmul's sense and falls back."""
    k = jax.random.split(jax.random.key(2), 8)
    params = {"w1": _normal(k[0], (5, 7)), "w2": _normal(k[1], (7, 6)), "w3": _normal(k[2], (3, 6)),
              "wv": _normal(k[3], (3, 3), 0.4)}

    def f(p, x):
        h = jnp.tanh(x @ (p["w1"] / np.sqrt(5.0)))
        h = jnp.tanh(h @ (jnp.sqrt(jnp.asarray(1.0 / 7.0)) * p["w2"]))
        h = jnp.tanh(h @ (0.4 * p["w3"]).T)
        return h @ (p["wv"] * jnp.arange(1.0, 4.0))

    return f, params, _normal(k[4], (4, 5)), _normal(k[5], (3, 5))


SCALED_CASES = [(None, True, False, None), ("factored", False, True, None), ("materialized", False, False, 2)]


def reference(f, params, x1, x2):
    """Full and traced kernels from explicit per-example Jacobians (no kernel method)."""
    j1 = np.asarray(flatten_jacobian(f, params, x1))
    j2 = j1 if x2 is None else np.asarray(flatten_jacobian(f, params, x2))
    full = np.einsum("iap,jbp->ijab", j1, j2)
    return {False: full, True: np.einsum("ijaa->ij", full)}


def jacobian_reference(f, params, x1, x2):
    """``{symmetric: {trace: K}}`` from ONE full ``jacobian``-method kernel of ``[x1; x2]``
    (one compile for every form of a slow-compiling model)."""
    n1 = jax.tree.leaves(x1)[0].shape[0]
    x = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
    full = empirical_ntk(f, params, x, trace=False, method="jacobian")
    out = {}
    for sym, k in ((True, full[:n1, :n1]), (False, full[:n1, n1:])):
        out[sym] = {False: k, True: np.einsum("ijaa->ij", k)}
    return out


def flatten_jacobian(f, params, x):
    """``(n, O, P)``: the Jacobian of the batch output ``(n, O)`` w.r.t. the shared params has
    example i's rows at output row i (examples do not interact)."""
    n = jax.tree.leaves(x)[0].shape[0]
    jac = jax.jacrev(lambda p: f(p, x).reshape(n, -1))(params)  # leaves (n, O, *leaf)
    return jnp.concatenate([leaf.reshape(n, leaf.shape[1], -1) for leaf in jax.tree.leaves(jac)], axis=-1)


# (forced contraction, trace, symmetric, block_size): per problem, every form (traced/full ×
# cross/symmetric) once, both forced contractions and blocking, with few compiles.
MLP_CASES = [(None, True, False, None), (None, False, True, 2), ("factored", False, False, None),
             ("materialized", True, True, None)]
DENSE_CASES = [(None, False, True, None), (None, True, False, 2), ("factored", True, True, None),
               ("materialized", False, False, 2)]


@pytest.mark.parametrize("problem,cases", [(mlp_problem, MLP_CASES), (dense_problem, DENSE_CASES),
                                           (scaled_problem, SCALED_CASES)])
def test_dense_nets_equal_reference_all_forms(problem, cases, monkeypatch):
    f, params, x1, x2 = problem()
    if problem is scaled_problem:  # scalar-scaled weights are linear sites, the vector-scaled one is not
        kinds = _kinds(structured_plan(f, params, x1, x2))
        assert kinds["['wv']"] == "fallback" and all(kinds[f"['{w}']"] != "fallback" for w in ("w1", "w2", "w3"))
    refs = {sym: reference(f, params, x1, None if sym else x2) for sym in (False, True)}
    for force, trace, sym, bs in cases:
        monkeypatch.setattr(structured, "FORCE_KIND", force)
        ref = refs[sym][trace]
        assert np.abs(ref).max() > 1e-3
        K = empirical_ntk(f, params, x1, None if sym else x2, trace=trace, method="structured", block_size=bs)
        np.testing.assert_allclose(K, ref, rtol=RTOL, atol=ATOL, err_msg=f"{force} {trace=} {sym=} {bs=}")


def test_jacobian_method_agrees_with_the_reference():
    """The oracle of the tests above against the library's ``jacobian`` method."""
    f, params, x1, x2 = dense_problem()
    np.testing.assert_allclose(empirical_ntk(f, params, x1, x2, trace=False, method="jacobian"),
                               reference(f, params, x1, x2)[False], rtol=RTOL, atol=ATOL)


def test_plans_name_linear_and_fallback_leaves():
    f, params, x1, _ = mlp_problem()
    kinds = _kinds(structured_plan(f, params, x1))
    assert kinds["['b1']"] == "fallback"
    assert {kinds["['w1']"], kinds["['w2']"], kinds["['w3']"]} <= {"factored", "materialized"}
    f, params, x1, _ = dense_problem()
    plan = structured_plan(f, params, x1, trace=False)
    kinds = _kinds(plan)
    assert {k: kinds[k] != "fallback" for k in kinds} == {
        "['gain']": False, "['head']": True, "['tied']": False, "['w_in']": True, "['w_sq']": False, "['w_t']": True}
    by_path = {leaf.path: leaf for leaf in plan.leaves}
    assert (by_path["['w_in']"].T, by_path["['w_in']"].d_in, by_path["['w_in']"].d_out) == (3, 4, 6)
    assert (by_path["['head']"].d_in, by_path["['head']"].d_out) == (6, 2)
    assert "2 dot_generals" in by_path["['tied']"].reason and by_path["['gain']"].reason.startswith("used by")
    # A wide MLP layer with T = 1 is cheaper factored; the cost model says so.
    c = structured.site_costs(64, 64, 10, 1, 512, 512, trace=True)
    assert c["factored"] < c["materialized"]


@pytest.mark.slow
def test_transformer_lora_equals_jacobian(monkeypatch):
    f, params, x1, x2 = transformer_problem()
    plan = structured_plan(f, params, x1, x2)
    assert set(_kinds(plan).values()) <= {"factored", "materialized"} and len(plan.leaves) == 4  # all LoRA A/B linear
    refs = jacobian_reference(f, params, x1, x2)
    for force, trace, sym, bs in (("factored", True, False, None), ("materialized", False, True, None)):
        monkeypatch.setattr(structured, "FORCE_KIND", force)
        ref = refs[sym][trace]
        K = empirical_ntk(f, params, x1, None if sym else x2, trace=trace, method="structured", block_size=bs)
        np.testing.assert_allclose(K, ref, rtol=RTOL, atol=ATOL, err_msg=f"{force} {trace=}")


@pytest.mark.slow
def test_gpt2_port_equals_jacobian():
    f, params, x1, x2 = gpt2_problem()
    plan = structured_plan(f, params, x1, x2)
    kinds = _kinds(plan)
    linear = sorted(p for p, k in kinds.items() if k != "fallback")
    assert linear and all("kernel" in p for p in linear), linear
    assert kinds["['wte']['embedding']"] == "fallback"  # embedding lookup + tied head
    ref = jacobian_reference(f, params, x1, x2)[True][False]  # full, symmetric: every contraction path
    K = empirical_ntk(f, params, x1, None, trace=False, method="structured")
    np.testing.assert_allclose(K, ref, rtol=RTOL, atol=ATOL)


def test_structured_matches_finite_differences():
    f, params, x1, x2 = mlp_problem()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    eps = 1e-6

    def jac(x):  # (n, O, P) by central differences, one parameter at a time
        cols = []
        for i in range(flat.size):
            d = jnp.zeros_like(flat).at[i].set(eps)
            cols.append((f(unravel(flat + d), x) - f(unravel(flat - d), x)) / (2 * eps))
        return np.stack([np.asarray(c) for c in cols], axis=-1)

    j1, j2 = jac(x1), jac(x2)
    fd = np.einsum("iap,jbp->ijab", j1, j2)
    K = empirical_ntk(f, params, x1, x2, trace=False, method="structured")
    np.testing.assert_allclose(K, fd, rtol=1e-6, atol=1e-8)


def test_auto_picks_structured_for_a_wide_mlp_and_reports_the_plan():
    k = jax.random.split(jax.random.key(3), 4)
    params = {"w1": _normal(k[0], (16, 96), 0.25), "w2": _normal(k[1], (96, 4), 0.1)}

    def f(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    x = _normal(k[2], (6, 16))
    K, info = empirical_ntk(f, params, x, trace=True, method="auto", return_info=True)
    assert info["method"] == "structured" and info["plan"].auto == "structured"
    assert info["plan"].summary() == {"factored": 2}
    np.testing.assert_allclose(K, empirical_ntk(f, params, x, method="jacobian"), rtol=RTOL, atol=ATOL)
    _, info = empirical_ntk(f, params, x, method="jacobian", return_info=True)
    assert info == {"method": "jacobian", "plan": None}


def test_auto_is_not_a_block_method():
    with pytest.raises(ValueError, match="auto"):
        ntk_fn(lambda p, x: x, method="auto", output_dim=1)


def test_site_cotangents_are_the_per_output_backward_passes():
    """``site_cotangents`` (the benchmarks' floor of any exact method): per output, the cotangent
    at each linear site's output and the other leaves' gradients, against closed forms of a
    one-hidden-layer tanh net ``f = tanh(x W1 + b1) W2 + b2``."""
    k = jax.random.split(jax.random.key(3), 3)
    params = {"b1": _normal(k[0], (5,)), "b2": jnp.zeros((3,), jnp.float64),
              "w1": _normal(k[1], (4, 5)), "w2": _normal(k[2], (5, 3))}
    x = _normal(jax.random.key(4), (6, 4))

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    deltas, fallback = jax.jit(lambda p, x: structured.site_cotangents(f, p, x, 3, basis_batch=2))(params, x)
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    want_hidden = (1 - h * h)[None] * params["w2"].T[:, None, :]        # (O, n, 5): δ at x W1
    want_out = jnp.broadcast_to(jnp.eye(3)[:, None, :], (3, 6, 3))     # (O, n, 3): δ at h W2
    by_width = {d.shape[-1]: np.asarray(d).reshape(3, 6, -1) for d in deltas.values()}
    assert sorted(by_width) == [3, 5]
    np.testing.assert_allclose(by_width[5], want_hidden, rtol=1e-12)
    np.testing.assert_allclose(by_width[3], want_out, rtol=1e-12)
    b1_grad, b2_grad = fallback  # the biases are not linear sites: their per-example gradients
    np.testing.assert_allclose(b1_grad, want_hidden, rtol=1e-12)
    np.testing.assert_allclose(b2_grad, want_out, rtol=1e-12)
