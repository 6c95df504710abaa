"""``benchmarks/model_profile.py``: its HLO parsing against closed-form FLOP counts, its trace
arithmetic on hand-made events, and one profiled program end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import model_profile as MP  # noqa: E402


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("m,k,n", [(64, 32, 16), (7, 5, 3)])
def test_dot_flops_matmul(m, k, n):
    x, w = jnp.ones((m, k)), jnp.ones((k, n))
    ops = MP.entry_ops(_hlo(lambda x, w: jnp.tanh(x @ w) + 1.0, x, w))
    assert sum(o["flops"] for o in ops.values()) == 2 * m * k * n
    assert {o["kind"] for o in ops.values() if o["flops"]} <= {"gemm", "dot"}


def test_dot_flops_batched_and_transposed():
    a, b = jnp.ones((3, 8, 5)), jnp.ones((3, 6, 5))
    # contraction over the minor axis of both operands, one batch axis
    ops = MP.entry_ops(_hlo(lambda a, b: jnp.einsum("bik,bjk->bij", a, b), a, b))
    assert sum(o["flops"] for o in ops.values()) == 2 * 3 * 8 * 6 * 5
    # a gradient: x^T g has the same FLOPs as the forward product
    x, w = jnp.ones((16, 4)), jnp.ones((4, 8))
    ops = MP.entry_ops(_hlo(jax.grad(lambda w, x: jnp.sum(jnp.sin(x @ w))), w, x))
    assert sum(o["flops"] for o in ops.values()) == 2 * 2 * 16 * 4 * 8


def test_array_dims_and_errors():
    assert MP.array_dims("f32[8,128]{1,0}") == (8, 128)
    assert MP.array_dims("f32[]") == ()
    with pytest.raises(ValueError, match="not an array shape"):
        MP.array_dims("(f32[2], f32[3])")
    with pytest.raises(ValueError, match="no ENTRY"):
        MP.parse_hlo("HloModule m\n")


def test_occupancy():
    events = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 20, "dur": 2}]
    assert MP.occupancy(events) == {1: 12, 2: 5, 0: 5}
    assert MP.occupancy([]) == {}


def test_op_events_join_by_name_or_hlo_op():
    ops = {"fusion.1": {}, "dot.2": {}}
    events = [{"name": "fusion.1", "ts": 0, "dur": 1},                               # a CPU thunk
              {"name": "loop_kernel_7", "ts": 1, "dur": 2, "args": {"hlo_op": "dot.2"}},  # a GPU kernel
              {"name": "$python frame", "ts": 0, "dur": 9},
              {"name": "other_kernel", "ts": 3, "dur": 1, "args": {"hlo_op": "not.in.module"}}]
    assert [e["op"] for e in MP.op_events(events, ops)] == ["fusion.1", "dot.2"]


def test_duplicated_fusions():
    ops = {"f1": {"kind": "elementwise", "operands": ["a", "b"], "shape": "f32[4]"},
           "f2": {"kind": "elementwise", "operands": ["a", "b"], "shape": "f32[4]"},
           "f3": {"kind": "elementwise", "operands": ["a"], "shape": "f32[4]"},
           "g": {"kind": "gemm", "operands": ["a", "b"], "shape": "f32[4]"}}
    groups = MP.duplicated_fusions(ops, {"f1": 3.0, "f2": 5.0, "f3": 1.0, "g": 9.0})
    assert len(groups) == 1
    assert sorted(groups[0]["fusions"]) == ["f1", "f2"]
    assert groups[0]["op_us"] == 8.0 and groups[0]["extra_us"] == 3.0


def test_profile_program_end_to_end():
    x, w = jnp.ones((256, 128)), jnp.ones((128, 64))
    fn = jax.jit(lambda x, w: jax.nn.relu(x @ w) @ w.T)
    out = MP.profile_program(fn, (x, w), calls=2)
    assert out["dots"]["gflop_per_call"] == pytest.approx(2 * 2 * 256 * 128 * 64 / 1e9)
    assert out["ops_traced"] >= 1 and out["ops_traced"] <= out["ops_in_program"]
    assert out["wall_ms"]["untraced_median"] > 0 and out["dots"]["ms_per_call"] > 0
    assert out["op_ms_per_call"]["total"] == pytest.approx(
        sum(v for k, v in out["op_ms_per_call"].items() if k != "total"))
    assert out["top_ops"] and all(t["ms"] >= 0 for t in out["top_ops"])


def test_model_profile_quick():
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "model_profile.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["settings"]["size"] == "tiny" and out["settings"]["what"] == "forward_backward"
    assert out["ops_traced"] == out["ops_in_program"]  # every op of the program ran and was seen
    assert out["dots"]["gflop_per_call"] > 0 and len(out["top_ops"]) <= 20


def test_torch_op_kinds():
    assert MP.torch_op_kind("aten::mm") == "matmul" and MP.torch_op_kind("aten::bmm") == "matmul"
    assert MP.torch_op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert MP.torch_op_kind("aten::mul") == "aten"
    assert MP.torch_op_kind("autograd::engine::evaluate_function: MmBackward0") == "other"


def test_model_profile_quick_with_torch():
    """``--torch``: both sides profiled on one checkpoint; PyTorch's matrix products count the
    same linear-layer FLOPs as the Flax program's dots, less the attention's (fused on its side)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    env = {**os.environ, "NTK_JAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "model_profile.py"), "--quick", "--torch",
                           "--what", "forward"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["settings"]["weights"] == "one transformers checkpoint" and "torch_version" in out
    t = out["torch"]
    assert t["clock"] == "cpu"
    assert t["wall_ms"]["untraced_median"] > 0 and t["self_ms_per_call"]["matmul"] > 0
    # tiny model, B 2, T 16, forward: the projections and the head (no attention products on
    # the torch side); the Flax count adds the attention's two batched products per layer.
    s = out["settings"]["model"]
    h, i, v, L = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    tokens = 2 * 16
    linear = 2 * tokens * (L * (h * h + 2 * h * kv + h * h + 3 * h * i + 8 * (h + h) + 8 * (h + kv)) + h * v)
    assert t["matmul"]["gflop_per_call"] == pytest.approx(linear / 1e9)
    assert out["dots"]["gflop_per_call"] > t["matmul"]["gflop_per_call"]
