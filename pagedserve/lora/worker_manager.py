"""The worker's adapters: `max_loras` slots in every adapted layer, an LRU of `max_cpu_loras`
adapters loaded in CPU memory, and the per-step mapping of batch rows to slots.

The scheduler never runs more than `max_loras` distinct adapters at once, so the adapters of one
step always find slots: a slot is only ever taken from an adapter that is not in the step.

Loading off the busy loop: `prefetch` reads, validates and prepares an adapter in a background
thread when its request arrives (the engine core holds the request back until that is done), so
a step only copies CPU tensors into a slot. A step that finds its adapter missing from the LRU
(never prefetched, or evicted by more distinct adapters than `max_cpu_loras` in between) still
reads it itself: correct, only slow; `num_step_loads` counts those.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from pagedserve.config.lora import LoRAConfig
from pagedserve.lora.layers import PACKED_MODULES, LoRAMapping, LoRASlots
from pagedserve.lora.lora_model import LoRAModel
from pagedserve.lora.request import LoRARequest
from pagedserve.models.layers.linear import LinearBase

# Up to this many tokens a step runs every token through every used slot (see lora/layers.py).
DENSE_LORA_MAX_TOKENS = 64

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def add_lora_slots(model: nn.Module, lora_config: LoRAConfig, dtype: torch.dtype) -> list[LoRASlots]:
    """Gives every q/k/v/o and gate/up/down projection of the decoder layers adapter slots."""
    slots = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        match = _LAYER_INDEX.search(name)
        if not isinstance(module, LinearBase) or leaf not in PACKED_MODULES or match is None:
            continue
        module.lora = LoRASlots(
            module, int(match.group(1)), PACKED_MODULES[leaf], lora_config.max_loras, lora_config.max_lora_rank, dtype
        )
        slots.append(module.lora)
    if not slots:
        raise ValueError(f"{type(model).__name__} has no q/k/v/o or gate/up/down projections to apply LoRA to")
    return slots


class LRUCacheWorkerLoRAManager:
    """vLLM's name. Adapters come from `prefetch` (background) or, failing that, from disk on
    first use by a step (the scheduler's `max_loras` cap bounds how many a step can need).

    Threads: `prefetch` is called by the engine core's thread, `prepare` by whichever thread runs
    the step (another one under async scheduling), loads finish on the loader thread; `_lock`
    guards `_known`, `_cpu_cache` and `_loading`, never held while reading a file.
    """

    def __init__(self, model: nn.Module, lora_config: LoRAConfig, dtype: torch.dtype) -> None:
        self.lora_config = lora_config
        self.dtype = dtype
        self.layers = add_lora_slots(model, lora_config, dtype)
        # llama.cpp's checkpoints keep q/k rows in interleaved-rotary order (GGUF Llama): the
        # adapter's q/k output rows (B) must follow the base weights' order.
        config = getattr(model, "config", None)
        self._interleaved_qk_heads: dict[str, int] | None = None
        if config is not None and getattr(config, "rope_is_neox_style", True) is False:
            self._interleaved_qk_heads = {
                "q_proj": config.num_attention_heads,
                "k_proj": config.num_key_value_heads,
            }
        # Adapters the batch's requests name, by id (where to load them from).
        self._known: dict[int, LoRARequest] = {}
        self._cpu_cache: OrderedDict[int, LoRAModel] = OrderedDict()  # LRU order: oldest first
        # Background reads in progress (an adapter is in at most one of _loading and _cpu_cache).
        self._loading: dict[int, Future[LoRAModel]] = {}
        self._lock = threading.Lock()
        self._loader: ThreadPoolExecutor | None = None
        # Adapters a step had to read from disk itself (the prefetch missed them).
        self.num_step_loads = 0
        self._slot_owner: list[int | None] = [None] * lora_config.max_loras
        self._slot_last_used = [0] * lora_config.max_loras
        self._num_steps = 0

    def add_request(self, lora_request: LoRARequest) -> None:
        with self._lock:
            self._known[lora_request.lora_int_id] = lora_request

    def list_adapters(self) -> list[int]:
        """Ids of the adapters in CPU memory."""
        with self._lock:
            return list(self._cpu_cache)

    def prefetch(self, lora_request: LoRARequest) -> Future[LoRAModel]:
        """Starts reading the adapter into the CPU LRU in the background; the future is done
        once it is there (or failed: the error is the future's, a step would raise it again)."""
        lora_id = lora_request.lora_int_id
        with self._lock:
            self._known[lora_id] = lora_request
            model = self._cpu_cache.get(lora_id)
            if model is not None:
                self._cpu_cache.move_to_end(lora_id)
                done: Future[LoRAModel] = Future()
                done.set_result(model)
                return done
            future = self._loading.get(lora_id)
            if future is not None:
                return future
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
            future = self._loader.submit(self._read, lora_request)
            self._loading[lora_id] = future
        # TRAP: outside the lock. A read that already finished (a broken file fails at once)
        # runs the callback right here, in this thread, and _store takes the lock.
        future.add_done_callback(lambda f: self._store(lora_id, f))
        return future

    def prepare(self, token_lora_ids: np.ndarray) -> LoRAMapping | None:
        """Slots for the adapters of this step's tokens (0: base model), loading what is
        missing; None when no token runs an adapter."""
        active_ids = np.unique(token_lora_ids)
        active_ids = active_ids[active_ids > 0].tolist()
        if not active_ids:
            return None
        self._num_steps += 1
        slots = [self._activate(lora_id, active_ids) for lora_id in active_ids]
        num_tokens = token_lora_ids.shape[0]
        if num_tokens <= DENSE_LORA_MAX_TOKENS:
            # slot_of_id[id] = slot + 1 for the step's adapters, 0 for the base model.
            slot_of_id = np.zeros(max(active_ids) + 1, dtype=np.int64)
            slot_of_id[active_ids] = np.asarray(slots) + 1
            token_slots = torch.from_numpy(slot_of_id[token_lora_ids])
            num_slots = max(slots) + 1
            # Column 0 of the one-hot is the base model's: dropped.
            slot_mask = torch.zeros(num_tokens, num_slots + 1, dtype=self.dtype)
            slot_mask[torch.arange(num_tokens), token_slots] = 1
            return LoRAMapping(slot_mask=slot_mask[:, 1:, None, None], token_slots=token_slots - 1)
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for lora_id, slot in zip(active_ids, slots):
            rows = np.flatnonzero(token_lora_ids == lora_id)
            first, last = int(rows[0]), int(rows[-1])
            if last - first + 1 == rows.size:
                groups.append((slot, slice(first, last + 1)))
            else:
                groups.append((slot, torch.from_numpy(rows)))
        return LoRAMapping(groups=groups)

    def _activate(self, lora_id: int, step_ids: list[int]) -> int:
        owners = self._slot_owner
        if lora_id in owners:
            slot = owners.index(lora_id)
        else:
            candidates = [s for s, owner in enumerate(owners) if owner is None or owner not in step_ids]
            if not candidates:
                raise RuntimeError(
                    f"a step uses more than max_loras={self.lora_config.max_loras} adapters (the scheduler caps it)"
                )
            slot = min(candidates, key=lambda s: (owners[s] is not None, self._slot_last_used[s]))
            weights = self._load(lora_id).weights
            for layer in self.layers:
                layer.set_lora(slot, weights)
            owners[slot] = lora_id
        self._slot_last_used[slot] = self._num_steps
        return slot

    def _load(self, lora_id: int) -> LoRAModel:
        with self._lock:
            model = self._cpu_cache.get(lora_id)
            if model is not None:
                self._cpu_cache.move_to_end(lora_id)
                return model
            future = self._loading.get(lora_id)
            request = self._known.get(lora_id)
        if future is None:
            if request is None:
                raise RuntimeError(f"LoRA adapter id {lora_id} was never sent to this worker")
            self.num_step_loads += 1
            future = Future()
            future.set_result(self._read(request))
        # A prefetch still running is waited for (the engine core admits a request only once
        # its prefetch is done, so this is the rare adapter that was evicted and read again).
        model = future.result()
        self._store(lora_id, future)
        return model

    def _read(self, request: LoRARequest) -> LoRAModel:
        """Disk read, validation and preparation of one adapter; touches no shared state."""
        model = LoRAModel.from_local_checkpoint(
            request.lora_path, request.lora_int_id, self.lora_config.max_lora_rank, self.dtype
        )
        if self._interleaved_qk_heads is not None:
            for (layer, module), (lora_a, lora_b) in model.weights.items():
                num_heads = self._interleaved_qk_heads.get(module)
                if num_heads is not None:
                    model.weights[layer, module] = (lora_a, _interleave_rotary_rows(lora_b, num_heads))
        return model

    def _store(self, lora_id: int, future: Future[LoRAModel]) -> None:
        """Puts a finished read into the LRU (most recent end); idempotent per future: both the
        loader's callback and a step waiting for the same future may get here first."""
        with self._lock:
            if self._loading.get(lora_id) is future:
                del self._loading[lora_id]
            elif lora_id in self._cpu_cache or future.cancelled() or future.exception() is not None:
                return
            if future.cancelled() or future.exception() is not None:
                return
            cache = self._cpu_cache
            cache[lora_id] = future.result()
            cache.move_to_end(lora_id)
            max_cpu_loras = self.lora_config.max_cpu_loras
            assert max_cpu_loras is not None
            while len(cache) > max_cpu_loras:
                cache.popitem(last=False)


def _interleave_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of each head from HF's half-split rotary order [x0..x(d/2-1), y0..] to llama.cpp's
    interleaved pairs [x0, y0, x1, y1, ...] (what llama.cpp's converter does to q/k weights)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, -1).transpose(1, 2).reshape(rows, -1).contiguous()
