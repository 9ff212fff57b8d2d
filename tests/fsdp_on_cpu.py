"""`python -m matvlm_cli ...` with accelerate's FSDP allowed on CPU processes, for the tests.

accelerate switches to FSDP only on accelerator backends and would quietly run DDP on CPU, although
PyTorch's FSDP2 itself shards over gloo. This lifts that one gate: when accelerate settles on
MULTI_CPU and an FSDP plugin was given, the run becomes FSDP with that plugin, so CI exercises real
sharding (DTensor parameters, gathers, reduce-scatters) without a GPU.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_decide = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _decide(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate records its choice


AcceleratorState.__init__ = _fsdp_on_cpu

from matvlm_cli.cli import main  # noqa: E402

main()
