"""Mesh construction and logical-axis rules on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from plm_jax.config import DEFAULT_AXIS_RULES, MeshConfig
from plm_jax.errors import ConfigError
from plm_jax.sharding import constrain, logical_to_spec, make_mesh, use_mesh


def test_mesh_shapes_from_config():
    assert dict(make_mesh(MeshConfig()).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert list(mesh.devices.flat) == jax.devices()  # process-major order kept
    with pytest.raises(ConfigError, match="multiply to 4, but there are 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))


def test_logical_rules():
    assert logical_to_spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    assert logical_to_spec(("act_batch", "act_seq", "act_embed")) == PartitionSpec(
        ("data", "fsdp"), None, None
    )
    # a mesh axis is used once per array: the second tensor-mapped dim stays replicated
    assert logical_to_spec(("heads", "mlp")) == PartitionSpec("tensor", None)
    assert logical_to_spec(("layers", "embed", None)) == PartitionSpec(None, "fsdp", None)
    custom = {**DEFAULT_AXIS_RULES, "embed": None, "mlp": ["fsdp", "tensor"]}
    assert logical_to_spec(("embed", "mlp"), custom) == PartitionSpec(None, ("fsdp", "tensor"))
    with pytest.raises(ConfigError, match="logical axis 'experts' has no entry in mesh.rules"):
        logical_to_spec(("experts",))


def test_constrain_applies_inside_use_mesh_only():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("act_batch", "act_seq", "act_embed")) is x  # no mesh: no-op
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("act_batch", "act_seq", "act_mlp")))(x)
    assert y.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 16)))


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
    from plm_jax.sharding import logical_to_sharding

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    kv = logical_to_sharding(("embed", "kv_heads", "head_dim"), mesh, shape=(64, 2, 16))
    assert kv.spec == PartitionSpec("fsdp", None, None)  # 2 kv heads on 4 tensor devices
    q = logical_to_sharding(("embed", "heads", "head_dim"), mesh, shape=(64, 8, 16))
    assert q.spec == PartitionSpec("fsdp", "tensor", None)
