"""Mesh construction and the logical-to-mesh rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from paxlike import sharding
from paxlike.errors import UserError
from paxlike.mesh import MESH_AXES, build_mesh, resolve_axis_sizes


def test_minus_one_takes_the_remaining_devices():
    assert resolve_axis_sizes({"data": 2, "tensor": -1}, 8) == {
        "data": 2, "pipeline": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 4}


@pytest.mark.parametrize("sizes,message", [
    ({"data": 3}, "multiply to 3 .* 8 device"),
    ({"data": -1, "fsdp": -1}, "only one mesh axis may be -1"),
    ({"data": 3, "fsdp": -1}, "does not divide the 8 devices"),
    ({"dta": 8}, r"unknown mesh axis \['dta'\]"),
    ({"data": 0}, "invalid mesh size mesh.data=0"),
])
def test_bad_mesh_sizes(sizes, message):
    with pytest.raises(UserError, match=message):
        resolve_axis_sizes(sizes, 8)


def test_mesh_axes_and_types():
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_dcn_must_match_the_granules():
    # One process: a DCN split of 2 has nothing to span.
    with pytest.raises(UserError, match="mesh.dcn sizes multiply to 2 but the devices form 1 processes"):
        build_mesh({"data": 2, "fsdp": 4}, {"data": 2})
    with pytest.raises(UserError, match="mesh.dcn.data=3 must be >= 1 and divide mesh.data=2"):
        build_mesh({"data": 2, "fsdp": 4}, {"data": 3})


def test_rules_skip_used_and_trivial_axes_and_refuse_indivisible():
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.get_rules("fsdp_tp")
    assert sharding.logical_to_spec(("batch", "length", "act_embed"), (8, 16, 32), rules, mesh) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), rules, mesh) == P("fsdp", "tensor")
    # A later dimension may not reuse an axis: both map to fsdp here, the second stays whole.
    assert sharding.logical_to_spec(("embed", "embed"), (32, 32), rules, mesh) == P("fsdp", None)
    with pytest.raises(UserError, match="'mlp' of size 3 is not divisible by mesh.tensor=2"):
        sharding.logical_to_spec(("embed", "mlp"), (32, 3), rules, mesh, "w")
    with pytest.raises(UserError, match="logical axis 'nope' has no sharding rule"):
        sharding.logical_to_spec(("nope",), (4,), rules, mesh)
    with pytest.raises(UserError, match="unknown sharding preset 'zero'"):
        sharding.get_rules("zero")


def test_constrain_is_identity_outside_the_trainer_and_shards_inside():
    x = jax.numpy.ones((8, 4))
    assert sharding.constrain(x, ("batch", "act_embed")) is x
    mesh = build_mesh({"data": 8})
    with sharding.use_rules(mesh, sharding.get_rules("data")):
        y = jax.jit(lambda v: sharding.constrain(v * 2, ("batch", "act_embed")))(x)
    assert y.sharding.spec in (P("data"), P("data", None))


def test_per_shard_runs_on_local_blocks_laid_out_by_the_rules():
    """A kernel that couples the length (a running sum) runs per shard with batch over data and
    heads over tensor, the length whole: same result as unsharded. active_axes names the mesh
    axes a logical dimension is split over (none outside the trainer)."""
    x = jax.random.normal(jax.random.key(0), (4, 6, 8, 3))      # [batch, length, heads, dim]
    names = ("batch", None, "heads", None)
    seen = []

    def running(a):
        seen.append(a.shape)
        return jax.numpy.cumsum(a, axis=1)
    assert sharding.active_axes("length") == ()
    assert bool(jax.numpy.all(sharding.per_shard(running, (x,), (names,), names) == running(x)))
    mesh = build_mesh({"data": 2, "context": 2, "tensor": 2})
    with sharding.use_rules(mesh, sharding.get_rules("fsdp_tp")):
        assert sharding.active_axes("length") == ("context",)
        assert sharding.active_axes("heads") == ("tensor",)
        y = jax.jit(lambda a: sharding.per_shard(running, (a,), (names,), names))(x)
    assert seen[-1] == (2, 6, 4, 3)          # a local block: the length arrived whole
    assert y.sharding.spec in (P("data", None, "tensor"), P("data", None, "tensor", None))
    assert bool(jax.numpy.allclose(y, running(x), atol=1e-6))
