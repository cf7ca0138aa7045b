"""No host synchronisation in DSA's per-layer hot path: nothing reads a tensor's value on the host (.item(), bool(),
.tolist(), a Python branch on a tensor, a shape that depends on data). On a GPU each such read waits for the device.

Checked without a GPU with torch's fake tensors (torch._subclasses.fake_tensor, what torch.compile traces with): they
carry shapes, dtypes and a device, "cuda" included, but no data, so any read of a value raises
DataDependentOutputException. Forward passes run on fake CUDA tensors (the code takes its CUDA branches); training
backward runs on fake CPU tensors (autograd's CUDA engine needs a real device), whose paths are the same but for the
inference-only CPU shortcut in torch_paths.sparse_attention_blocks. docs/performance.md lists what was found."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import Qwen2Config, Qwen2ForCausalLM

import dsa
from dsa.backends import CpuBackend, TorchBackend
from dsa.core import Backend, dsa_attention

B, HQ, HKV, D, H_I, D_I, K = 2, 4, 2, 16, 2, 16, 8
# chunks of 16 queries at 64 keys (several chunks: the dense shortcut, then selection); masked dense attention up to
# 2 K keys, blocked sparse attention beyond
BACKENDS = {"reference": lambda: Backend(chunk_elements=64 * 16),
            "torch": lambda: TorchBackend(chunk_elements=64 * 16, masked_dense_keys=2, train_block_elements=2 * K * D),
            "cpu": lambda: CpuBackend(chunk_elements=64 * 16, masked_dense_keys=2)}  # fmt: skip
CASES = [(64, 64, False), (64, 64, True), (1, 80, False), (1, 80, True)]  # T queries, S keys, key padding: prefill, decode


def layer_inputs(device: str, T: int, S: int, padding: bool, grad: bool):
    def t(*shape):
        return torch.randn(*shape, device=device, requires_grad=grad)

    q, k, v = t(B, HQ, T, D), t(B, HKV, S, D), t(B, HKV, S, D)
    q_I, k_I, w_I = t(B, T, H_I, D_I), t(B, S, D_I), t(B, T, H_I)
    key_padding = torch.ones(B, S, dtype=torch.bool, device=device) if padding else None
    return q, k, v, q_I, k_I, w_I, torch.arange(S - T, S, device=device), key_padding


def warmup_args(x: tuple) -> tuple:
    """q, k, q_I, k_I, w_I, query_pos, key_padding of layer_inputs' q, k, v, q_I, k_I, w_I, query_pos, key_padding."""
    return x[:2] + x[3:]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("T,S,padding", CASES)
def test_layer_forward_on_cuda_reads_no_tensor_value(name, T, S, padding):
    """dsa_attention at inference and in training (its loss), and the warm-up loss: on (fake) CUDA tensors."""
    backend = BACKENDS[name]()
    with FakeTensorMode():
        for training in (False, True):
            with torch.set_grad_enabled(training):
                x = layer_inputs("cuda", T, S, padding, training)
                out, loss = dsa_attention(*x, K, 0.25, training, backend)
                assert out.is_cuda and out.shape == (B, T, HQ, D) and (loss is not None) == training
                if training:
                    assert backend.warmup_loss(*warmup_args(x), 0.25).shape == ()


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_training_backward_reads_no_tensor_value(name):
    """Forward and backward of the sparse stage (attention + indexer KL) and of the warm-up loss, on fake tensors."""
    backend = BACKENDS[name]()
    with FakeTensorMode():
        x = layer_inputs("cpu", 64, 64, True, True)
        out, loss = dsa_attention(*x, K, 0.25, True, backend)
        (out.sum() + loss + backend.warmup_loss(*warmup_args(x), 0.25)).backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in x[:6])


def fake_cuda_model(mode: FakeTensorMode) -> torch.nn.Module:
    """A 2-layer DSA model (built for real: its construction may read values) with every parameter and buffer
    replaced by a fake CUDA tensor."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = dsa.add_indexers(Qwen2ForCausalLM(config), dsa.DSAConfig(2, 16, 8, K))
    dsa.set_backend(model, "torch")
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    fake = mode.from_tensor(tensor.detach())
                    with mode:
                        fake = fake.to("cuda")
                    store[name] = torch.nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else fake
    return model


def test_whole_model_on_cuda_reads_no_tensor_value():
    """The model's forward in training (sparse and warm-up mode) and a prefill + decode step through the cache, on
    fake CUDA tensors, without an attention mask (DSAModel.forward reads whether a given mask has padding, once
    per forward: docs/performance.md)."""
    mode = FakeTensorMode()
    model = fake_cuda_model(mode)
    with mode:
        ids = torch.randint(0, 64, (1, 48), device="cuda")
        for stage in ("sparse", "warmup"):
            dsa.set_mode(model, stage).train()
            out = model(input_ids=ids, labels=ids, use_cache=False)
            assert out.loss.shape == out.indexer_loss.shape == ()
        dsa.set_mode(model, "sparse").eval()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            out = model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)
        assert out.logits.shape == (1, 1, 64) and out.logits.is_cuda
