"""Multi-LoRA serving: many PEFT adapters over one base model in the same batch.

    request.py         LoRARequest (what a user names per request)
    peft_helper.py     reading and validating a PEFT adapter directory
    lora_model.py      an adapter's A/B matrices in CPU memory, per target module
    layers.py          per-linear-layer adapter slots and the batched (grouped) LoRA product
    worker_manager.py  the worker's slots (max_loras) and CPU LRU (max_cpu_loras)
"""
