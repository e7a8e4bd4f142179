"""GPT model tests (CPU). The flash path runs the real Triton kernel through TRITON_INTERPRET=1
(set by the repository's conftest.py), so every shape here is tiny."""
import logging
import math
from pathlib import Path

import longctx.model.attention as attention
import longctx.model.gpt as gpt
import pytest
import torch
from longctx.model import GPT, GPTConfig, build_model
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(seq_len=32, vocab_size=96, pad_vocab_multiple=32, n_layer=2, n_head=2, n_embd=32)


def tiny(impl="sdpa", seed=0, block_mask=None, device=None, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, "attn_impl": impl, **kw}), block_mask=block_mask, device=device)


def compose(model_name: str, impl: str = "sdpa", seq_len: int = 1024):
    return OmegaConf.create({"model": OmegaConf.load(ROOT / f"configs/model/{model_name}.yaml"),
                             "attention": OmegaConf.load(ROOT / f"configs/attention/{impl}.yaml"),
                             "seq_len": seq_len})


# ---------------------------------------------------------------- an independent reference GPT-2
def ref_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y + b if b is not None else y


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_linear(x, sd, name):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def reference_logits(sd: dict, idx: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
    """GPT-2 forward written out: per-head loops, explicit causal softmax, weights from a state dict."""
    B, T = idx.shape
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    C = x.shape[-1]
    D = C // n_head
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"blocks.{i}."
        h = ref_layernorm(x, sd[p + "ln_1.weight"], sd.get(p + "ln_1.bias"))
        qkv = ref_linear(h, sd, p + "attn.c_attn")
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        heads = []
        for hd in range(n_head):
            s = slice(hd * D, (hd + 1) * D)
            scores = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(D)
            scores = scores.masked_fill(~causal, float("-inf"))
            e = torch.exp(scores - scores.max(-1, keepdim=True).values)
            heads.append((e / e.sum(-1, keepdim=True)) @ v[..., s])
        x = x + ref_linear(torch.cat(heads, dim=-1), sd, p + "attn.c_proj")
        h = ref_layernorm(x, sd[p + "ln_2.weight"], sd.get(p + "ln_2.bias"))
        x = x + ref_linear(ref_gelu(ref_linear(h, sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")
    x = ref_layernorm(x, sd["ln_f.weight"], sd.get("ln_f.bias"))
    return x @ sd["wte.weight"].T  # tied output embedding


@pytest.mark.parametrize("impl", ["sdpa", "naive"])
@pytest.mark.parametrize("bias", [True, False])
def test_logits_match_reference(impl, bias):
    m = tiny(impl, bias=bias).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for name, p in m.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 96, (2, 32))
    logits, loss = m(idx)
    assert loss is None and logits.shape == (2, 32, 96) and logits.dtype == torch.float64
    sd = {k: v for k, v in m.state_dict().items()}
    ref = reference_logits(sd, idx, n_layer=2, n_head=2)
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)
    # and the loss is the mean cross-entropy of those logits
    tgt = torch.randint(0, 96, (2, 32))
    _, loss = m(idx, tgt)
    ref_loss = -torch.log_softmax(ref, -1).gather(-1, tgt[..., None]).mean()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)


def _loss_and_grads(impl, state, idx, tgt, block_mask=None):
    m = tiny(impl, block_mask=block_mask)
    m.load_state_dict(state)
    _, loss = m(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


def test_flash_sdpa_naive_same_loss_and_grads(monkeypatch):
    """flash runs our Triton kernel (interpreter on CPU); it must exist, this test never skips."""
    from longctx.kernels.flash import flash_attention  # an ImportError here is a failure

    from longctx import kernels
    calls = []
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: calls.append(1) or flash_attention(*a, **kw))
    state = tiny("sdpa", seed=3).state_dict()
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 96, (2, 32), generator=g), torch.randint(0, 96, (2, 32), generator=g)
    tgt[0, :5] = -1  # ignored positions
    loss_ref, grads_ref = _loss_and_grads("naive", state, idx, tgt)
    for impl in ["sdpa", "flash"]:
        loss, grads = _loss_and_grads(impl, state, idx, tgt)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6, msg=f"{impl} loss")
        for n in grads_ref:
            torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6, msg=f"{impl} grad {n}")
    assert len(calls) == 2, "attention=flash did not run the Triton kernel (did it fall back to sdpa?)"


def test_block_sparse_seam_dense_layout_equals_naive():
    from longctx.kernels import dense_block_mask, local_mask
    state = tiny("sdpa", seed=4).state_dict()
    idx = torch.randint(0, 96, (2, 32))
    loss_ref, grads_ref = _loss_and_grads("naive", state, idx, idx)
    mask = dense_block_mask(32, block_m=16, block_n=16, causal=True)
    loss, grads = _loss_and_grads("block_sparse", state, idx, idx, block_mask=mask)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["wte.weight"], grads_ref["wte.weight"], rtol=1e-4, atol=1e-6)
    # build_model builds the mask from cfg.attention and keeps it off the state dict
    sizes = {k: v for k, v in TINY.items() if k != "seq_len"}
    cfg = OmegaConf.create({"model": sizes, "seq_len": 32,
                            "attention": {"impl": "block_sparse", "layout": "local", "block_size": 16,
                                          "window_blocks": 1}})
    m = build_model(cfg)
    assert m.block_mask is not None and all(b.attn.attn_impl == "block_sparse" for b in m.blocks)
    assert torch.equal(m.block_mask.layout, local_mask(32, block_m=16, block_n=16, window_blocks=1,
                                                       causal=True).layout)
    assert not any("mask" in k for k in m.state_dict())


def test_qkv_are_strided_views_in_bnhd(monkeypatch):
    seen = []

    sdpa = attention.ATTENTION["sdpa"]

    def spy(q, k, v, causal, block_mask):
        seen.append((q, k, v))
        return sdpa(q, k, v, causal, block_mask)

    monkeypatch.setitem(attention.ATTENTION, "sdpa", spy)  # looked up once, when the model is built
    m = tiny("sdpa")
    m(torch.randint(0, 96, (2, 16)))
    q, k, v = seen[0]
    assert q.shape == k.shape == v.shape == (2, 16, 2, 16)  # (B, N, H, D)
    C = 32
    assert q.stride() == (16 * 3 * C, 3 * C, 16, 1)  # rows of the fused (B, N, 3C) output
    assert k.data_ptr() - q.data_ptr() == C * q.element_size()  # same storage, no copy
    assert v.data_ptr() - q.data_ptr() == 2 * C * q.element_size()


# ---------------------------------------------------------------- sizes, FLOPs, init, groups
@pytest.mark.parametrize("name,expected", [
    ("gpt2_small", 124_475_904), ("gpt2_medium", 354_871_296),
    ("gpt2_large", 774_090_240), ("gpt2_xl", 1_557_686_400)])
def test_param_counts(name, expected):
    with torch.device("meta"):
        m = build_model(compose(name, seq_len=1024))
    assert m.config.padded_vocab_size == 50304
    assert m.num_params() == expected
    if name == "gpt2_small":  # unpadded vocabulary: nanoGPT's / Hugging Face's 124,439,808
        with torch.device("meta"):
            m1 = GPT(GPTConfig(seq_len=1024, pad_vocab_multiple=1))
        assert m1.num_params() == 124_439_808
        assert m.num_params(non_embedding=True) == 124_475_904 - 50304 * 768 - 1024 * 768


def test_flops_per_token_formula():
    with torch.device("meta"):
        m = build_model(compose("gpt2_small", seq_len=4096))
    L, d, V = 12, 768, 50304
    n = L * (12 * d * d + 13 * d) + 2 * d  # blocks (weights, biases, LayerNorms) + ln_f
    assert m.flops_per_token(4096) == 6 * (n + V * d) + 6 * L * d * 4096
    assert m.flops_per_token() == m.flops_per_token(4096)


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    L = 12
    m = GPT(GPTConfig(seq_len=64, vocab_size=512, n_layer=L, n_head=4, n_embd=256))
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in m.blocks]
                     + [b.mlp.c_proj.weight.flatten() for b in m.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02)
    other = torch.cat([b.attn.c_attn.weight.flatten() for b in m.blocks]
                      + [b.mlp.c_fc.weight.flatten() for b in m.blocks] + [m.wte.weight.flatten()])
    assert other.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        if ".ln_" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
    assert m.lm_head.weight is m.wte.weight


def test_optim_groups_cover_every_parameter_once():
    m = tiny()
    decay, no_decay = m.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"]] + [id(p) for p in no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    linear_weights = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    linear_weights.discard(id(m.lm_head.weight))  # tied: it is the wte embedding
    assert {id(p) for p in decay["params"]} == linear_weights
    assert id(m.wte.weight) in {id(p) for p in no_decay["params"]}
    assert all(p.dim() == 1 for p in no_decay["params"] if p is not m.wte.weight and p is not m.wpe.weight)


# ---------------------------------------------------------------- behaviour and bad input
def test_longer_than_seq_len_raises():
    m = tiny()
    m(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="33 tokens.*seq_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=30, n_head=4), "divisible"), (dict(attn_impl="fast"), "unknown attention impl"),
    (dict(seq_len=0), "seq_len"), (dict(dropout=1.5), "dropout")])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_flash_cpu_fallback_resolved_once_and_logged_once(monkeypatch, caplog):
    """Without CUDA (and no interpreter) attention=flash is resolved to sdpa when the model is built,
    logged once per process; cpu_fallback=error stops with one line instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(attention, "_fallback_logged", set())
    idx = torch.randint(0, 96, (2, 16))
    with caplog.at_level(logging.INFO, logger="longctx.model.attention"):
        m, m2, ref = tiny("flash", device="cpu"), tiny("flash", device="cpu"), tiny("sdpa")
        out1, _ = m(idx)
        m2(idx)
    msgs = [r.getMessage() for r in caplog.records if r.name == "longctx.model.attention"]
    assert len(msgs) == 1 and "needs a CUDA GPU" in msgs[0] and "sdpa" in msgs[0]
    assert all(b.attn.attn_impl == "sdpa" for b in m.blocks)
    torch.testing.assert_close(out1, ref(idx)[0])
    with pytest.raises(ValueError, match="attention=flash needs a CUDA GPU .*cpu_fallback=sdpa"):
        tiny("flash", cpu_fallback="error", device="cpu")


def test_autocast_logits_dtype_and_fp32_loss():
    m = tiny()
    idx = torch.randint(0, 96, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        none, loss = m(idx, idx)  # the chunked loss: no logits are built
        logits, loss_plain = m(idx, idx, return_logits=True)
    assert none is None and loss.dtype == torch.float32
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 16, 96) and loss_plain.dtype == torch.float32
    torch.testing.assert_close(loss, loss_plain, rtol=1e-3, atol=1e-3)


def test_chunked_loss_equals_full_logits_loss_fp64():
    m = tiny(seed=5).double()
    m.loss_chunk_tokens = 7  # several chunks, the last one partial
    idx, tgt = torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))
    tgt[1, 3:9] = -1
    _, loss = m(idx, tgt)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    _, ref = m(idx, tgt, return_logits=True)
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


def test_dropout_only_in_train_mode():
    m = tiny(dropout=0.5)
    idx = torch.randint(0, 96, (2, 16))
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])


def test_generate_crops_context_and_never_samples_padding():
    m = tiny(vocab_size=90).eval()  # padded to 96: ids 90..95 must never appear
    with torch.no_grad():
        m.lm_head.weight[90:] = 0
        m.ln_f.bias.zero_()
        m.ln_f.bias[0] = 1.0
        m.lm_head.weight[90:, 0] = 100.0  # padded logits would dominate
    out = m.generate(torch.zeros(2, 30, dtype=torch.long), max_new_tokens=6, temperature=1.0, top_k=5)
    assert out.shape == (2, 36) and out.max() < 90
    greedy = m.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=3, temperature=0)
    assert greedy.shape == (1, 7) and greedy.max() < 90


def test_build_model_from_configs():
    m = build_model(compose("gpt2_tiny", "naive", seq_len=256))
    assert (m.config.n_layer, m.config.n_head, m.config.n_embd) == (4, 4, 128)
    assert m.wpe.weight.shape == (256, 128) and m.config.attn_impl == "naive"
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 4
    x = torch.randn(1, 8, 128)
    assert m.blocks[0](x).shape == x.shape  # one tensor in, one out
    with torch.device("meta"):  # 16k context: positions are sized from seq_len
        assert build_model(compose("gpt2_small", "flash", seq_len=16384)).wpe.weight.shape == (16384, 768)
