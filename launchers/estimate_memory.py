"""Per-GPU memory of model states (params, grads, Adam states) under ZeRO-2 / ZeRO-3 / ZeRO-3+offload.

Full fine-tuning figures come from DeepSpeed's own estimators: `estimate_zero2_model_states_mem_needs`
and `estimate_zero3_model_states_mem_needs`, the functions whose results the `..._all_cold` helpers
print as tables (bf16 weights + fp32 master weights, gradients and Adam moments; ZeRO-3 also holds
the largest layer gathered, counted by DeepSpeed at 4 bytes per parameter). LoRA figures: frozen bf16
weights (2 bytes/param, sharded under ZeRO-3) plus 16 bytes per adapter parameter.

    python launchers/estimate_memory.py            # prints the markdown tables of docs/scaling.md
"""

from __future__ import annotations

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

GB = 2**30
# name: (total parameters, largest layer = the embedding matrix, hidden, layers, LoRA q,v params at r=8)
MODELS = {
    # Llama-3.2-3B: vocab 128,256 x hidden 3,072, 28 layers, 8 KV heads of 128 (v_proj out 1,024)
    "Llama-3.2-3B": (3_212_749_824, 128_256 * 3_072, 3_072, 28, 28 * 8 * ((3_072 + 3_072) + (3_072 + 1_024))),
    # Llama-2-7B: vocab 32,000 x hidden 4,096, 32 layers, MHA
    "Llama-2-7B": (6_738_415_616, 32_000 * 4_096, 4_096, 32, 32 * 8 * ((4_096 + 4_096) * 2)),
    # Llama-3.1-8B: vocab 128,256 x hidden 4,096, 32 layers, 8 KV heads of 128
    "Llama-3.1-8B": (8_030_261_248, 128_256 * 4_096, 4_096, 32, 32 * 8 * ((4_096 + 4_096) + (4_096 + 1_024))),
}
LAYOUTS = [(1, 1), (8, 1), (8, 2)]  # (GPUs per node, nodes)


def full_finetune(total: int, largest: int, gpus: int, nodes: int) -> dict[str, float]:
    """GiB per GPU: ZeRO-2, ZeRO-3, ZeRO-3 + optimizer and parameter offload (DeepSpeed's estimates)."""
    _, z2_gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    _, z3_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    off_cpu, off_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True
    )
    return {
        "zero2": z2_gpu / GB,
        "zero3": z3_gpu / GB,
        "zero3_offload": off_gpu / GB,
        "offload_cpu_per_node": off_cpu / GB,
    }


def lora(total: int, largest: int, adapters: int, gpus: int, nodes: int) -> dict[str, float]:
    """GiB per GPU with LoRA: bf16 frozen weights + 16 B per adapter parameter (Adam, fp32 master, grads)."""
    world = gpus * nodes
    return {
        "zero2": (2 * total + 16 * adapters / world + 2 * adapters) / GB,
        "zero3": (2 * total / world + 2 * largest + 16 * adapters / world) / GB,
    }


def main() -> None:
    print(
        "| model | GPUs | ZeRO-2 | ZeRO-3 | ZeRO-3 + offload (GPU / CPU per node) | LoRA r=8 ZeRO-2 | LoRA r=8 ZeRO-3 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (total, largest, _, _, adapters) in MODELS.items():
        for gpus, nodes in LAYOUTS:
            f = full_finetune(total, largest, gpus, nodes)
            lo = lora(total, largest, adapters, gpus, nodes)
            print(
                f"| {name} | {gpus * nodes} | {f['zero2']:.1f} | {f['zero3']:.1f} | "
                f"{f['zero3_offload']:.1f} / {f['offload_cpu_per_node']:.0f} | {lo['zero2']:.1f} | {lo['zero3']:.1f} |"
            )


if __name__ == "__main__":
    main()
