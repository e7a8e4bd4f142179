"""The FlashAttention torch.library ops (kernels/ops.py): schema, fake and autograd registrations
(torch.library.opcheck), and torch.compile tracing through `flash_attention` with no graph break,
dense and block-sparse, against the float64 reference. CPU through Triton's interpreter."""
import torch
from longctx.kernels import flash_attention, local_mask, ops, reference_attention


def _qkv(n=64, h=2, d=16, seed=0):
    # a fused (B, N, 3, H, D) projection: q, k, v are strided views, as in the model
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, 3, h, d, generator=g).requires_grad_()


def _attn(block_mask=None):
    def f(qkv):
        q, k, v = qkv.unbind(2)
        return flash_attention(q, k, v, causal=True, block_mask=block_mask)
    return f


def _reference(qkv, block_mask=None):
    x = qkv.detach().double().requires_grad_()
    q, k, v = x.unbind(2)
    return reference_attention(q, k, v, causal=True, block_mask=block_mask), x


def _check_against_reference(fn, qkv, block_mask=None):
    out = fn(qkv)
    do = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, do)
    ref, x = _reference(qkv, block_mask)
    (ref_grad,) = torch.autograd.grad(ref, x, do.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


def test_opcheck_dense_and_block_sparse():
    # schema, fake tensor, autograd registration and AOT dispatch of the op
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g).requires_grad_() for _ in range(3))
    bm = local_mask(32, window_blocks=1, block_m=16, block_n=16, causal=True)
    for mask_id in (-1, ops.register_mask(bm)):
        torch.library.opcheck(ops.flash_attn_fwd, (q, k, v, True, 0.25, "auto", mask_id, -1),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ops.flash_attn_fwd, (q, k, v, True, 0.25, "ieee", ops.register_mask(bm), -1))


def _same_output_and_grads(out, ref, inputs):
    """out and ref (compiled and eager calls on the same inputs) agree, and so do their gradients."""
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, do)
    ref_grads = torch.autograd.grad(ref, inputs, do)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_compiled_gpt_block_has_no_graph_break():
    """A transformer block with attention=flash traces into ONE graph (torch._dynamo.explain), and
    compiles with fullgraph=True (AOTAutograd: fake implementation + autograd formula) to the eager
    block's output and gradients."""
    from longctx.model.gpt import Block, GPTConfig

    torch.manual_seed(0)
    block = Block(GPTConfig(seq_len=64, n_layer=1, n_head=2, n_embd=32, attn_impl="flash"), "flash")
    x = torch.randn(2, 64, 32, requires_grad=True)
    explain = torch._dynamo.explain(block)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), block(x)
    _same_output_and_grads(out, ref, [x, *block.parameters()])
    # and the attention inside matches the float64 reference
    _check_against_reference(torch.compile(_attn(), fullgraph=True, backend="aot_eager"), _qkv())


def test_compiled_block_takes_the_block_mask_as_input():
    """A per-block compiled GPT block receives the model's BlockMask as a forward argument (an input
    of the compiled frame, not a closure constant): compiled output and gradients equal eager."""
    from longctx.model.gpt import Block, GPTConfig

    torch.manual_seed(0)
    block = Block(GPTConfig(seq_len=64, n_layer=1, n_head=2, n_embd=32, attn_impl="block_sparse"), "block_sparse")
    bm = local_mask(64, window_blocks=1, block_m=16, block_n=16, causal=True)
    x = torch.randn(2, 64, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager")
    out, ref = compiled(x, bm), block(x, bm)
    _same_output_and_grads(out, ref, [x, *block.parameters()])


def test_compile_block_sparse_fullgraph():
    # each mask object gets its own id (a constant of the graph): a new mask recompiles, and the
    # compiled call computes that mask's layout
    for window in (0, 2):
        bm = local_mask(64, window_blocks=window, block_m=16, block_n=16, causal=True)
        explain = torch._dynamo.explain(_attn(bm))(_qkv(seed=2))
        assert explain.graph_break_count == 0, explain.break_reasons
        fresh = local_mask(64, window_blocks=window, block_m=16, block_n=16, causal=True)  # not seen yet
        torch._dynamo.reset()
        compiled = torch.compile(_attn(fresh), fullgraph=True, backend="aot_eager")
        _check_against_reference(compiled, _qkv(seed=2), fresh)


def test_inductor_keeps_strided_views_and_matches_eager():
    # Inductor lays out the op's inputs from the fake implementation's strides: the compiled call
    # must give what the eager one gives, bit for bit (same kernels, same inputs)
    dtype = torch.bfloat16
    qkv = _qkv(seed=3).detach().to(dtype).requires_grad_()
    torch._dynamo.reset()
    f = _attn()
    compiled = torch.compile(f, fullgraph=True)
    do = torch.randn(1, 64, 2, 16).to(dtype)
    out = compiled(qkv)
    (grad,) = torch.autograd.grad(out, qkv, do)
    out_e = f(qkv)
    (grad_e,) = torch.autograd.grad(out_e, qkv, do)
    assert torch.equal(out, out_e) and torch.equal(grad, grad_e)
