"""Adapters are read off the busy loop: a request's adapter is loaded in a background thread
while the running requests keep decoding, and the step only copies it into a slot. The decode
steps with adapter tokens run the fused C++ decode layer where it is built."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from pagedserve import SamplingParams
from pagedserve.engine import FinishReason
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core import EngineCore
from pagedserve.engine.processor import Processor
from pagedserve.lora.lora_model import LoRAModel
from pagedserve.lora.request import LoRARequest
from pagedserve.models.layers.fused_decode import FusedDecoder
from pagedserve.tokenizer import get_tokenizer
from tests.conftest import peft_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 10


class _GatedLoader:
    """LoRAModel.from_local_checkpoint that waits for `release` on the worker's loader thread.
    Called on any other thread (one that runs steps) it fails at once: that step would wait for
    the disk (here forever)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.num_calls = 0
        self._read = LoRAModel.from_local_checkpoint

    def __call__(self, *args, **kwargs) -> LoRAModel:
        self.num_calls += 1
        thread = threading.current_thread().name
        if not thread.startswith("lora-load"):
            raise AssertionError(f"a LoRA adapter was read from disk on thread {thread!r}, not the loader")
        assert self.release.wait(timeout=120), "the test never released the loader"
        return self._read(*args, **kwargs)


def test_adapter_loads_in_the_background_while_running_requests_decode(
    make_tiny_checkpoint, make_lora_adapter, monkeypatch
) -> None:
    base = make_tiny_checkpoint("llama")
    lora = LoRARequest("bg", 1, make_lora_adapter(base, 8, seed=7))
    config = EngineArgs(
        model=base, dtype="float32", max_model_len=128, enable_lora=True, max_loras=1, max_lora_rank=8
    ).create_engine_config()
    core = EngineCore(config)
    processor = Processor(
        config.model_config, get_tokenizer(base), [], config.scheduler_config, lora_config=config.lora_config
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = {"base": [101, 102, 103, 104, 105], "adapter": [201, 202, 203, 204, 205, 206, 207]}
    tokens: dict[str, list[int]] = {"base": [], "adapter": []}
    finish_reasons: dict[str, FinishReason] = {}

    def step() -> set[str]:
        """One engine step; the ids that got tokens."""
        got = set()
        for output in core.step().outputs:
            tokens[output.request_id] += output.new_token_ids
            if output.new_token_ids:
                got.add(output.request_id)
            if output.finish_reason is not None:
                finish_reasons[output.request_id] = output.finish_reason
        return got

    loader = _GatedLoader()
    monkeypatch.setattr(LoRAModel, "from_local_checkpoint", loader)
    num_fused_lora_steps = 0
    fused_call = FusedDecoder.__call__

    def counting_fused_call(self, embeddings, positions, decode_step):
        nonlocal num_fused_lora_steps
        num_fused_lora_steps += decode_step.lora_slots is not None
        return fused_call(self, embeddings, positions, decode_step)

    monkeypatch.setattr(FusedDecoder, "__call__", counting_fused_call)
    core.add_request(processor.process_inputs("base", {"prompt_token_ids": prompts["base"]}, params)[0])
    for _ in range(3):  # with async scheduling the first call only starts a step
        if step():
            break
    assert tokens["base"]
    adapter_request = processor.process_inputs(
        "adapter", {"prompt_token_ids": prompts["adapter"]}, params, lora_request=lora
    )[0]
    core.add_request(adapter_request)
    # The adapter is being read (blocked in the loader): the base request decodes every step.
    for _ in range(4):
        assert step() == {"base"}
    assert loader.num_calls == 1
    assert core.get_num_unfinished_requests() == 2 and core.scheduler.get_num_unfinished_requests() == 1

    loader.release.set()
    while core.has_unfinished_requests():
        step()
    manager = core.executor.worker.model_runner.lora_manager
    assert manager.num_step_loads == 0 and manager.list_adapters() == [1]
    assert finish_reasons == {"base": FinishReason.LENGTH, "adapter": FinishReason.LENGTH}
    if core.executor.worker.model_runner.model.model._fused is not None:  # C++ kernels built here
        assert num_fused_lora_steps >= MAX_TOKENS - 2  # the adapter's decodes (async: one less)
    monkeypatch.undo()
    assert tokens["base"] == peft_greedy(base, None, [prompts["base"]], MAX_TOKENS)[0]
    assert tokens["adapter"] == peft_greedy(base, lora.lora_path, [prompts["adapter"]], MAX_TOKENS)[0]

    # A second request of the same adapter finds it in CPU memory and goes straight to the scheduler.
    core.add_request(processor.process_inputs("again", {"prompt_token_ids": prompts["adapter"]}, params, lora_request=lora)[0])
    assert core.scheduler.get_num_unfinished_requests() == 1
    core.shutdown()


class _InlineExecutor:
    """Runs the read in the submitting thread: the future is finished before the manager adds
    its done-callback, the order a fast failing read takes on a busy machine."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:
            future.set_exception(error)
        return future


@pytest.mark.timeout(120)
@pytest.mark.parametrize("read", ["background", "finished_before_callback"])
def test_adapter_that_cannot_be_read_fails_its_request_and_the_engine_keeps_serving(
    make_tiny_checkpoint, make_lora_adapter, tmp_path, read: str
) -> None:
    import shutil

    base = make_tiny_checkpoint("llama")
    broken = tmp_path / "broken"
    shutil.copytree(make_lora_adapter(base, 8, seed=7), broken)
    config = EngineArgs(
        model=base, dtype="float32", max_model_len=128, enable_lora=True, max_lora_rank=8
    ).create_engine_config()
    core = EngineCore(config)
    if read == "finished_before_callback":
        core.executor.worker.model_runner.lora_manager._loader = _InlineExecutor()
    processor = Processor(
        config.model_config, get_tokenizer(base), [], config.scheduler_config, lora_config=config.lora_config
    )
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    request = processor.process_inputs(
        "broken", {"prompt_token_ids": [101, 102]}, params, lora_request=LoRARequest("broken", 1, str(broken))
    )[0]
    # Validated by the frontend, then damaged before the engine reads the tensors.
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    core.add_request(request)
    core.add_request(processor.process_inputs("base", {"prompt_token_ids": [101, 102]}, params)[0])
    outputs = {}
    while core.has_unfinished_requests():
        for output in core.step().outputs:
            outputs.setdefault(output.request_id, []).append(output)
    assert outputs["broken"][-1].finish_reason == FinishReason.ERROR and not outputs["broken"][-1].new_token_ids
    assert outputs["base"][-1].finish_reason == FinishReason.LENGTH
    core.shutdown()
