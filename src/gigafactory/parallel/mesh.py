"""From a `Layout` to one `DeviceMesh`.

Dimensions, outermost first: ``pp, dp_replicate, efsdp, ep, cp, tp``. Expert parallelism borrows ranks from dp_shard
(see `specs.layout`): ``dp_shard = efsdp · ep``, so the mesh is built with the two factors and ``dp_shard`` is their
flattened view. Non-expert weights are FSDP-sharded over ``dp_shard·cp`` (``dp_shard_cp``); experts are split over
``ep`` and FSDP-sharded over ``efsdp`` only. Every sub-mesh slices the same root, which FSDP2 needs to compose
with DTensor parameters on ``tp`` or ``ep``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gigafactory.specs import ModelSpec
from gigafactory.specs.layout import Layout, check_supported

# torch 2.13 warns on every slice of a flattened mesh dim (a future API change we track, not the user's concern);
# each rank would print it several times per run.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh", category=UserWarning)

DIMS = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")


def check_layout(layout: Layout, spec: ModelSpec, world_size: int) -> Layout:
    """The one supported-layout check (`specs.layout.check_supported`); one-line `UserError`s, no process-group
    work."""
    return check_supported(layout, spec, world_size)


@dataclass
class Meshes:
    """The root mesh and the views the parallel styles use."""

    world: DeviceMesh
    layout: Layout

    @property
    def tp(self) -> DeviceMesh:
        return self.world["tp"]

    @property
    def ep(self) -> DeviceMesh:
        return self.world["ep"]

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]

    @property
    def pp(self) -> DeviceMesh:
        return self.world["pp"]

    @property
    def dp(self) -> DeviceMesh:
        """All data-parallel ranks (the batch is split over these)."""
        return self.world["dp"]

    def fsdp(self, experts: bool = False) -> DeviceMesh:
        """The mesh FSDP shards over: (dp_replicate, dp_shard·cp) for dense weights (they are replicated over
        cp, so FSDP also sums their gradients over cp), (dp_replicate, efsdp) for experts; 2-D (HSDP) only when
        dp_replicate > 1. Under ``Layout.dp_mode == "zero1"`` (dp_shard·cp = 1) the dense weights are sharded
        over dp_replicate (a distributed optimizer, `fsdp.apply_fsdp`)."""
        shard = "efsdp" if experts else "dp_shard_cp"
        if self.layout.dp_mode == "zero1" and not experts:
            return self.world["dp_replicate"]
        if self.layout.dp_replicate > 1:
            return self.world["dp_replicate", shard]
        return self.world[shard]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.world[name].get_group()


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    efsdp = layout.dp_shard // layout.ep
    shape = (layout.pp, layout.dp_replicate, efsdp, layout.ep, layout.cp, layout.tp)
    world = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    world["efsdp", "ep"]._flatten("dp_shard")
    world["efsdp", "ep", "cp"]._flatten("dp_shard_cp")
    world["dp_replicate", "efsdp", "ep"]._flatten("dp")
    return Meshes(world, layout)
