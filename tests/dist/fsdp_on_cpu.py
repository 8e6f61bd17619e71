"""Let accelerate run FSDP on CPU ranks, so the Trainer's FSDP2 path can be tested over gloo.

accelerate turns an FSDP plugin on only for accelerator devices: on the CPU its state stays
MULTI_CPU and the model is wrapped in DDP. That is a device gate, not a limit of the FSDP2 code
behind it (accelerate's fsdp2_prepare_model, the Trainer's FSDP checkpoint save and load, torch's
FSDP2 collectives all run on gloo). Lifting the gate makes the tests run exactly that code at world 2
on the CPU; on a GPU nothing is lifted (benchmarks/gpu_suite.py's trainer_fsdp2 step).
"""

_original_init = None


def lift_accelerate_fsdp_device_gate() -> None:
    """From now on in this process, an AcceleratorState given an FSDP plugin on CPU ranks runs FSDP."""
    global _original_init
    import accelerate.state as state
    from accelerate.utils import DistributedType

    if _original_init is not None:
        return
    _original_init = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            # PartialState is what the Trainer and the Accelerator read later (get_state_dict, saving)
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init
