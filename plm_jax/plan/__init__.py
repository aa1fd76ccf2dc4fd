"""`plm-jax plan`: the compiled train step's memory, FLOPs and collectives, for any devices."""

from plm_jax.plan.planner import plan, plan_model
from plm_jax.plan.report import format_plan
from plm_jax.plan.topology import parse_topology, topology_devices

__all__ = ["format_plan", "parse_topology", "plan", "plan_model", "topology_devices"]
