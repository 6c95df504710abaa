"""A model port is one file: a module that registers itself (:mod:`ntk_jax.models.ports`) is
loaded, sharded and exported to PEFT through the public API with no library file edited."""
import importlib.util
import json
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ntk_jax.models import hf_loading, ports
from ntk_jax.models import sharding as sh
from ntk_jax.models.lora import LoRAConfig
from ntk_jax.models.peft_export import save_peft_adapter

PORT = '''
"""A two-layer MLP "port" (a stand-in for a new model family)."""
import dataclasses

import jax.numpy as jnp
from flax import nnx

from ntk_jax.models.hf_loading import TensorMap, WeightMap
from ntk_jax.models.layers import LayerNorm
from ntk_jax.models.lora import LoRALinear
from ntk_jax.models.ports import PartitionNames, PeftModule, PeftSpec, register_architecture


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    d: int
    h: int
    dtype: str = "float32"
    param_dtype: str = "float32"


class TinyMLP(nnx.Module):
    def __init__(self, c, *, rngs):
        dt = jnp.dtype(c.param_dtype)
        self.ln = LayerNorm(c.d, 1e-5, param_dtype=dt)
        self.fc_up = LoRALinear(c.d, c.h, use_bias=True, rngs=rngs, param_dtype=dt)
        self.fc_down = LoRALinear(c.h, c.d, use_bias=False, rngs=rngs, param_dtype=dt)

    def __call__(self, x):
        return self.fc_down(jnp.tanh(self.fc_up(self.ln(x))))


HF = {"fc_up": "mlp.c_in", "fc_down": "mlp.c_out"}


def weight_map(config, hf_names):
    return WeightMap((TensorMap("mlp.c_in.weight", "fc_up.kernel", transpose=True),
                      TensorMap("mlp.c_in.bias", "fc_up.bias"),
                      TensorMap("mlp.c_out.weight", "fc_down.kernel", transpose=True),
                      TensorMap("norm.weight", "ln.weight"), TensorMap("norm.bias", "ln.bias")))


register_architecture(
    "tiny_mlp_port", lambda d: TinyConfig(d["d"], d["h"]), TinyMLP, weight_map,
    partition=PartitionNames(column=("fc_up",), row=("fc_down",), replicated=("ln",)),
    peft={TinyMLP: PeftSpec("FEATURE_EXTRACTION", lambda model, path: PeftModule(HF[path]))})
'''


@pytest.fixture
def tiny_port(tmp_path, monkeypatch):
    """The port above as a module outside the library, imported (so registered) for one test."""
    ports.discover_ports()  # the library's ports registered before the registry is swapped for a copy
    monkeypatch.setattr(ports, "_REGISTRY", dict(ports._REGISTRY))
    path = tmp_path / "tiny_mlp_port.py"
    path.write_text(PORT)
    spec = importlib.util.spec_from_file_location("tiny_mlp_port", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tiny_mlp_port", module)
    spec.loader.exec_module(module)
    return module


def _checkpoint(directory, d=4, h=6):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"mlp.c_in.weight": rng.normal(size=(h, d)).astype(np.float32),
               "mlp.c_in.bias": rng.normal(size=(h,)).astype(np.float32),
               "mlp.c_out.weight": rng.normal(size=(d, h)).astype(np.float32),
               "norm.weight": np.ones(d, np.float32), "norm.bias": np.zeros(d, np.float32)}
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny_mlp_port", "d": d, "h": h}))
    return tensors


def test_new_port_loads_shards_and_exports(tiny_port, tmp_path):
    tensors = _checkpoint(tmp_path / "ckpt")
    assert "tiny_mlp_port" in ports.supported_model_types()
    assert ports.LAZY_MODULES["tiny_mlp_port"] == "tiny_mlp_port"

    model = hf_loading.from_pretrained(tmp_path / "ckpt", lora=LoRAConfig(rank=2, targets=("fc_up", "fc_down")))
    assert type(model) is tiny_port.TinyMLP
    np.testing.assert_array_equal(np.asarray(model.fc_up.kernel[...]), tensors["mlp.c_in.weight"].T)

    # Sharding: the default rules now cover the port's names by their registered roles.
    plan = sh.sharding_plan(model, sh.make_mesh(1, 1))  # raises for a parameter no rule matches
    assert {"fc_up.kernel", "fc_down.lora.lora_a", "ln.weight"} <= set(plan.specs)
    assert sh.spec_for("fc_up.kernel") == P("data", "model") and sh.spec_for("fc_up.bias") == P("model")
    assert sh.spec_for("fc_down.kernel") == P("model", "data")
    assert sh.spec_for("fc_down.lora.lora_a") == P("model", None)
    assert sh.spec_for("fc_up.lora.lora_b") == P(None, "model")
    assert sh.spec_for("ln.weight") == P() and sh.spec_for("ln.bias") == P()
    assert sh.spec_for("layers.0.self_attn.q_proj.kernel") == P("data", "model")  # other ports still covered
    sharded = hf_loading.from_pretrained(tmp_path / "ckpt", mesh=sh.make_mesh(1, 1))
    np.testing.assert_array_equal(np.asarray(sharded.fc_down.kernel[...]), tensors["mlp.c_out.weight"].T)

    # PEFT: module names and task type from the registered spec.
    cfg = save_peft_adapter(model, tmp_path / "adapter")
    assert cfg["task_type"] == "FEATURE_EXTRACTION" and cfg["target_modules"] == ["fc_down", "fc_up"]
    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.mlp.c_in.lora_A.weight" in keys and "base_model.model.mlp.c_out.lora_B.weight" in keys


def test_unknown_model_type_names_the_known_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_port"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'no_such_port'; supported: \[.*'gpt2'.*'llama'"):
        hf_loading.from_pretrained(tmp_path)


def test_every_library_port_registers_roles_and_peft():
    """The ports of the library register through the same call: each model type's module is
    the port's own file, and each port gives partition names."""
    modules = dict(ports.LAZY_MODULES)
    assert modules["llama"] == modules["ntk_jax_decoder"] == "ntk_jax.models.transformer"
    assert modules["gpt2"] == "ntk_jax.models.gpt2"
    assert {modules[t] for t in ("bert", "roberta", "xlm-roberta", "camembert")} == {"ntk_jax.models.bert"}
    with_roles = {ports.get_architecture(t).module for t in modules if ports.get_architecture(t).partition.column}
    assert with_roles >= {"ntk_jax.models.transformer", "ntk_jax.models.gpt2", "ntk_jax.models.bert"}
    with pytest.raises(TypeError, match="PEFT export supports"):
        ports.peft_spec(object())
