"""From a `Layout` to one `DeviceMesh`.

Dimensions, outermost first: ``pp, dp_replicate, efsdp, ep, tp``. Expert parallelism borrows ranks from dp_shard
(see `specs.layout`): ``dp_shard = efsdp · ep``, so the mesh is built with the two factors and ``dp_shard`` is their
flattened view. Non-expert weights are FSDP-sharded over ``dp_shard``; experts are split over ``ep`` and
FSDP-sharded over ``efsdp`` only. Every sub-mesh slices the same root, which FSDP2 needs to compose with DTensor
parameters on ``tp`` or ``ep``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gigafactory.errors import UserError
from gigafactory.specs import ModelSpec
from gigafactory.specs.layout import Layout

# torch 2.13 warns on every slice of a flattened mesh dim (a future API change we track, not the user's concern);
# each rank would print it several times per run.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh", category=UserWarning)

DIMS = ("pp", "dp_replicate", "efsdp", "ep", "tp")


def check_layout(layout: Layout, spec: ModelSpec, world_size: int) -> Layout:
    """`Layout.validate` plus what this trainer does not run yet; one-line `UserError`s, no process-group work."""
    layout.validate(spec, world_size)
    if layout.cp > 1:
        raise UserError("cp > 1 (context parallelism) is not implemented by the trainer yet; use cp=1")
    if layout.pp > 1 and layout.world_size != layout.pp:
        raise UserError(f"pp={layout.pp} combined with other degrees is not implemented yet; use pp alone")
    if layout.ep > 1 and layout.tp > 1:
        raise UserError("ep > 1 together with tp > 1 is not implemented yet; use one of them")
    if layout.ep > 1 and layout.dp_replicate > 1 and layout.dp_shard == layout.ep:
        raise UserError("ep with dp_replicate needs dp_shard > ep so experts are FSDP-sharded; raise dp_shard")
    if layout.pp_schedule == "interleaved" and layout.pp_virtual == 1 and layout.pp > 1:
        raise UserError("pp_schedule=interleaved needs pp_virtual > 1")
    return layout


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
    def pp(self) -> DeviceMesh:
        return self.world["pp"]

    @property
    def dp(self) -> DeviceMesh:
        """All data-parallel ranks (the batch is split over these)."""
        return self.world["dp"]

    def fsdp(self, experts: bool = False) -> DeviceMesh:
        """The mesh FSDP shards over: (dp_replicate, dp_shard) for dense weights, (dp_replicate, efsdp) for
        experts; 2-D (HSDP) only when dp_replicate > 1."""
        shard = "efsdp" if experts else "dp_shard"
        if self.layout.dp_replicate > 1:
            return self.world["dp_replicate", shard]
        return self.world[shard]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.world[name].get_group()


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    efsdp = layout.dp_shard // layout.ep
    shape = (layout.pp, layout.dp_replicate, efsdp, layout.ep, layout.tp)
    world = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    world["efsdp", "ep"]._flatten("dp_shard")
    world["dp_replicate", "efsdp", "ep"]._flatten("dp")
    return Meshes(world, layout)
