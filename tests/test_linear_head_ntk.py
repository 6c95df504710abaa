"""The eNTK of ``u(θ, x) · W`` with a fixed head from ``u``'s Jacobian
(ntk_jax.kernels.ntk.linear_head_ntk) and its language-model form
(ntk_jax.kernels.outputs.lm_hidden_output_fn / lm_output_head).

Oracle: the kernel of the composed function itself by per-example Jacobians (``method="jacobian"``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_jax.kernels.ntk import empirical_ntk, linear_head_ntk
from ntk_jax.kernels.outputs import lm_hidden_output_fn, lm_output_fn, lm_output_head
from ntk_jax.models.lora import LoRAConfig, apply_lora
from ntk_jax.models.subset import param_subset
from ntk_jax.models.transformer import DecoderConfig, DecoderLM

RTOL = 2e-5


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())


@pytest.mark.parametrize("O, lead", [(7, ()), (2, ()), (5, (3,))])  # O > d, O < d (rank-2 head), lead axes
def test_matches_the_composed_function(O, lead):
    rng = np.random.default_rng(O)
    d, n1, n2 = 4, 5, 3
    params = {"A": jnp.asarray(rng.normal(size=(6, 8)) / 2, jnp.float32),
              "B": jnp.asarray(rng.normal(size=(8, d * int(np.prod(lead, dtype=int)))) / 2, jnp.float32)}
    W = jnp.asarray(rng.normal(size=(d, O)), jnp.float32)

    def u(p, x):
        return (jnp.tanh(x @ p["A"]) @ p["B"]).reshape(x.shape[0], *lead, d)

    def f(p, x):
        return u(p, x) @ W

    x1 = jnp.asarray(rng.normal(size=(n1, 6)), jnp.float32)
    x2 = jnp.asarray(rng.normal(size=(n2, 6)), jnp.float32)
    for trace in (True, False):
        for b in (None, x2):
            _close(linear_head_ntk(u, W, params, x1, b, trace=trace),
                   empirical_ntk(f, params, x1, b, trace=trace, method="jacobian"))
    # a second call reuses the composed function (and so its compiled programs)
    _close(linear_head_ntk(u, W, params, x1, trace=True, method="jacobian"),
           empirical_ntk(f, params, x1, trace=True, method="jacobian"))


def test_bad_heads_are_named():
    u = lambda p, x: x @ p  # noqa: E731
    p, x = jnp.ones((3, 2)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"head must be a \(d, O\) matrix"):
        linear_head_ntk(u, np.ones(3), p, x)
    with pytest.raises(ValueError, match="non-finite"):
        linear_head_ntk(u, np.full((2, 2), np.nan), p, x)
    with pytest.raises(ValueError, match="not a multiple of the head's d = 3"):
        linear_head_ntk(u, np.ones((3, 5)), p, x, trace=False)
    assert np.all(linear_head_ntk(u, np.zeros((2, 5)), p, x) == 0)


def _lm(tied: bool):
    model = DecoderLM(DecoderConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                    tie_word_embeddings=tied), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj"), b_init_std=0.1), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 40, size=(5, 9)).astype(np.int32)
    mask = np.ones((5, 9), np.int32)
    mask[1, 7:] = 0
    loss_mask = np.zeros((5, 9), np.float32)
    loss_mask[:, 3:7] = 1.0
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}
    return model, batch


@pytest.mark.parametrize("tied", [False, True])
def test_language_model_logits_kernel(tied):
    """V = 40 logits from d = 16 hidden states: the same kernel as lm_output_fn's, both reductions."""
    model, batch = _lm(tied)
    subset = param_subset(model)
    W = lm_output_head(model)
    assert W.shape == (16, 40)
    for reduce in ("mean", "none"):
        u, f = lm_hidden_output_fn(subset, reduce=reduce), lm_output_fn(subset, reduce=reduce)
        np.testing.assert_allclose(np.asarray(u(subset.params, batch) @ W), np.asarray(f(subset.params, batch)),
                                   rtol=1e-5, atol=1e-5)
        _close(linear_head_ntk(u, W, subset.params, batch, trace=True),
               empirical_ntk(f, subset.params, batch, trace=True, method="jacobian"))
    first, second = ({k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()})
    u, f = lm_hidden_output_fn(subset), lm_output_fn(subset)
    _close(linear_head_ntk(u, W, subset.params, first, second, trace=False),
           empirical_ntk(f, subset.params, first, second, trace=False, method="jacobian"))


def test_a_head_in_the_parameters_is_refused():
    model, _ = _lm(tied=False)
    with pytest.raises(ValueError, match="output matrix is among the kernel's parameters"):
        lm_hidden_output_fn(param_subset(model, nnx.Param))
    tied, _ = _lm(tied=True)
    with pytest.raises(ValueError, match="embed_tokens"):
        lm_hidden_output_fn(param_subset(tied, nnx.Param))
    with pytest.raises(ValueError, match="unknown reduce"):
        lm_hidden_output_fn(param_subset(model), reduce="max")


def test_the_default_call_goes_through_the_head_when_it_is_narrower():
    """``empirical_ntk(lm_output_fn(subset), ...)`` with ``method="auto"`` takes the head route
    when d < V (and says so), and not when d ≥ V or the model is called another way."""
    model, batch = _lm(tied=False)  # d 16 < V 40
    subset = param_subset(model)
    f = lm_output_fn(subset)
    for trace in (True, False):
        K, info = empirical_ntk(f, subset.params, batch, trace=trace, return_info=True)
        assert info["method"].startswith("linear_head+"), info
        _close(K, empirical_ntk(f, subset.params, batch, trace=trace, method="jacobian"))
    wide = DecoderLM(DecoderConfig(vocab_size=12, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                     rngs=nnx.Rngs(0))
    apply_lora(wide, LoRAConfig(rank=2, targets=("q_proj",), b_init_std=0.1), rngs=nnx.Rngs(1))
    small = {**batch, "input_ids": batch["input_ids"] % 12}
    _, info = empirical_ntk(lm_output_fn(param_subset(wide)), param_subset(wide).params, small, return_info=True)
    assert not info["method"].startswith("linear_head")  # d 16 ≥ V 12: the plain plan
    custom = lm_output_fn(subset, call=lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"]))
    assert not hasattr(custom, "linear_head")
    assert lm_output_fn(param_subset(model, nnx.Param)).linear_head() is None  # the head is a parameter


def test_sharded_driver_takes_the_head_route_for_traced_kernels(tmp_path, monkeypatch):
    """``sharded_empirical_ntk`` (a one-device mesh) on an LM's logits: the traced kernel goes
    through the head (and equals the plain one), the full kernel does not."""
    import jax

    import ntk_jax.kernels.ntk as ntk_module
    from ntk_jax.kernels.sharded import sharded_empirical_ntk

    calls = []
    real = ntk_module.traced_head_output
    monkeypatch.setattr(ntk_module, "traced_head_output", lambda *a: calls.append(1) or real(*a))

    model, batch = _lm(tied=True)
    subset = param_subset(model)
    f = lm_output_fn(subset)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), ("data", "model"))
    for trace, routed in ((True, [1]), (False, [])):
        calls.clear()
        _close(sharded_empirical_ntk(f, subset.params, batch, mesh=mesh, block_size=2, trace=trace),
               empirical_ntk(f, subset.params, batch, trace=trace, method="jacobian"))
        assert calls == routed


def test_sum_of_logits_through_the_head_never_forms_the_logits():
    """``sum_of_outputs(lm_output_fn(subset))`` (NTK-Selector's score, ``ntk_scalar_fn``) equals
    the summed logits, and its program holds no ``(n, T, V)`` array; the Jacobian-free kernel
    is unchanged."""
    import jax

    from ntk_jax.kernels.features import sum_of_outputs
    from ntk_jax.kernels.ntk import jacobian_free_ntk

    model, batch = _lm(tied=False)  # V = 40
    subset = param_subset(model)
    f = lm_output_fn(subset)
    s = sum_of_outputs(f)
    np.testing.assert_allclose(np.asarray(s(subset.params, batch)), np.asarray(f(subset.params, batch)).sum(axis=1),
                               rtol=1e-5, atol=1e-5)
    shapes = [v.aval.shape for e in jax.make_jaxpr(s)(subset.params, batch).eqns for v in e.outvars]
    assert (5, 9, 40) not in shapes and all(not (len(sh) == 3 and sh[-1] == 40) for sh in shapes)
    plain = lambda p, b: f(p, b)  # noqa: E731  (no head attribute: the logits route)
    assert (5, 9, 40) in [v.aval.shape for e in jax.make_jaxpr(sum_of_outputs(plain))(subset.params, batch).eqns
                          for v in e.outvars]
    _close(jacobian_free_ntk(f, subset.params, batch), jacobian_free_ntk(plain, subset.params, batch))


def test_the_head_route_inside_a_trace_leaks_nothing():
    """A score built inside ``jax.jit`` from a concrete model (the head read as a constant) and
    one built from traced state (the plain route) both give the summed logits."""
    import jax

    from ntk_jax.kernels.features import sum_of_outputs
    from ntk_jax.models.subset import ParamSubset

    model, batch = _lm(tied=True)
    subset = param_subset(model)
    want = np.asarray(lm_output_fn(subset)(subset.params, batch)).sum(axis=1)

    @jax.jit
    def inside(params, b):
        return sum_of_outputs(lm_output_fn(subset))(params, b)

    @jax.jit
    def traced_state(params, frozen, b):
        sub = ParamSubset(subset.graphdef, params, frozen, subset._template)
        return sum_of_outputs(lm_output_fn(sub))(params, b)

    for got in (inside(subset.params, batch), inside(subset.params, batch),
                traced_state(subset.params, subset.frozen, batch)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
