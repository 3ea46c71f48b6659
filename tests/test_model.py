import pytest
import torch

from lmforge.config import load_recipe
from lmforge.generate import SamplingParams, filter_logits, generate, greedy_batch, sample_next
from lmforge.model import GPT, GPTConfig, apply_rope

from .conftest import REPO


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=48)).eval()


def test_logits_shape_and_causality(model):
    x = torch.randint(0, 97, (3, 20))
    logits = model(x)
    assert logits.shape == (3, 20, 97)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    # positions before the change cannot see it
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:], atol=1e-3)


def test_output_mask_gives_the_logits_and_loss_of_the_marked_positions(model):
    from lmforge.model import lm_loss
    from lmforge.train.loop import batch_loss, scored_positions

    x = torch.randint(0, 97, (3, 20))
    y = torch.full((3, 20), -100)
    y[0, 15:18] = torch.tensor([1, 2, 3])
    y[2, 19] = 4
    marked = y != -100
    assert torch.allclose(model(x, output_mask=marked), model(x)[marked], atol=1e-6)
    assert scored_positions(y) == (4, True) and scored_positions(torch.zeros(3, 20, dtype=torch.long)) == (60, False)
    assert torch.allclose(batch_loss(model, x, y, True), lm_loss(model(x), y), atol=1e-6)


def test_targets_return_the_loss_of_the_logits_and_train_the_same(model):
    """forward(x, targets=y) (what training calls, so compile fuses the loss) is lm_loss of the logits,
    to the bit, and its gradients are those of the loss computed outside."""
    from lmforge.model import lm_loss
    from lmforge.train.loop import batch_loss

    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    y[0, :5] = -100
    inside = model(x, targets=y)
    outside = lm_loss(model(x), y)
    assert inside.dim() == 0 and torch.equal(inside, outside)
    assert torch.equal(batch_loss(model, x, y, False), outside)
    grads = []
    for loss_of in (lambda: model(x, targets=y), lambda: lm_loss(model(x), y)):
        model.zero_grad()
        loss_of().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_varying_lengths_compile_without_a_graph_break_per_block(model):
    """torch.compile of fine-tuning's varying sequence lengths (a dynamic length dimension): the forward pass
    with its loss is one graph, and output_mask adds only the break its data-dependent row count needs."""
    import torch._dynamo as dynamo

    x = torch.randint(0, 97, (3, 40))
    dynamo.mark_dynamic(x, 1)
    dynamo.reset()
    whole = dynamo.explain(lambda ids: model(ids, targets=ids))(x)
    assert (whole.graph_count, whole.graph_break_count) == (1, 0), [b.reason for b in whole.break_reasons]
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[:, -3:] = True
    dynamo.reset()
    sparse = dynamo.explain(lambda ids, m: model(ids, output_mask=m))(x, mask)
    assert sparse.graph_break_count == 1 and "nonzero" in sparse.break_reasons[0].reason
    dynamo.reset()


def test_rotary_tables_are_made_once_and_not_saved(model):
    """cos/sin come from tables made at construction (row p = position p, HF Llama's layout, sin's first half
    negated); they follow the model to its device but stay out of the weights, so checkpoints keep their
    format."""
    cfg = model.cfg
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.tensor([0.0, 5.0, 47.0])[:, None] * inv_freq
    expected = torch.cat([angles, angles], -1)
    assert model.rope_cos.shape == (cfg.block_size, d)
    assert torch.allclose(model.rope_cos[[0, 5, 47]], expected.cos()) and torch.allclose(
        model.rope_signed_sin[[0, 5, 47]], expected.sin() * torch.tensor([-1.0] * (d // 2) + [1.0] * (d // 2))
    )
    assert not any(k.startswith("rope_") for k in model.state_dict())
    with pytest.raises(ValueError, match="exceeds the model's block size"):
        model.new_cache(1, cfg.block_size + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_is_llamas_bit_for_bit(model, dtype):
    """apply_rope's roll and signed sin give exactly Llama's x * cos + rotate_half(x) * sin."""
    cfg = model.cfg
    x = torch.randn(2, cfg.n_head, 9, cfg.head_dim).to(dtype)
    cos, signed_sin = (t[:9].to(dtype) for t in (model.rope_cos, model.rope_signed_sin))
    half = cfg.head_dim // 2
    sin = torch.cat([-signed_sin[:, :half], signed_sin[:, half:]], -1)
    x1, x2 = x[..., :half], x[..., half:]
    llama = x * cos + torch.cat([-x2, x1], -1) * sin
    assert torch.equal(apply_rope(x, cos, signed_sin), llama)


def flash_attention_calls(gpt: GPT, x: torch.Tensor) -> int:
    """How many times a forward (and, with gradients on, a backward) of `gpt` on `x` ran the CPU
    flash-attention kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    flash = (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    )

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func in flash
            return func(*args, **(kwargs or {}))

    with Count():
        loss = gpt(x, targets=x)
        if loss.requires_grad:
            loss.backward()
    return Count.calls


def test_cpu_training_runs_short_sequences_in_the_math_attention_kernel():
    """Training on CPU, sequences up to CPU_MATH_ATTENTION_MAX_LEN take PyTorch's math kernel (its backward is
    2-4x faster there than the flash kernel's); longer ones, and inference, the flash kernel. The gradients
    are the same either way."""
    import lmforge.model as model_module

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=97))
    short, long = torch.randint(0, 97, (2, 64)), torch.randint(0, 97, (2, 256))
    assert model_module.CPU_MATH_ATTENTION_MAX_LEN < 256
    assert flash_attention_calls(gpt, short) == 0
    assert flash_attention_calls(gpt, long) == 2 * 2  # forward and backward of each layer
    with torch.no_grad():
        assert flash_attention_calls(gpt.eval(), short) == 2  # inference: the flash forward, faster there
    gpt.train().zero_grad()
    gpt(short, targets=short).backward()
    math_grads = [p.grad.clone() for p in gpt.parameters()]
    gpt.zero_grad()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "CPU_MATH_ATTENTION_MAX_LEN", 0)
        assert flash_attention_calls(gpt, short) == 2 * 2
        gpt.zero_grad()
        gpt(short, targets=short).backward()
    for math_grad, p in zip(math_grads, gpt.parameters(), strict=True):
        torch.testing.assert_close(math_grad, p.grad, rtol=1e-4, atol=1e-6)


def test_compiled_bf16_training_with_attention_dropout_has_finite_gradients():
    """On CPU, PyTorch 2.13's inductor gave NaN key-projection gradients for rotary embeddings written with
    torch.cat, under bf16 autocast with attention dropout (seed-67m's dropout 0.1 failed at step 2 with
    --pretrain.compile true). apply_rope swaps the halves with a roll instead."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=64, vocab_size=97, dropout=0.1))
    x = torch.randint(0, 97, (2, 64))
    dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.compile(gpt)(x, targets=x)
    loss.backward()
    dynamo.reset()
    assert not [n for n, p in gpt.named_parameters() if not torch.isfinite(p.grad).all()]


def test_kv_cache_matches_full_forward(model):
    x = torch.randint(0, 97, (2, 16))
    full = model(x)
    cache = model.new_cache(2)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 16)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_under_bf16_autocast_holds_bf16_and_matches_full_forward(model):
    """Under autocast (bf16 evaluation) the cache stores keys/values in bf16, as the projections make them,
    and cached decoding still follows the full forward pass (to bf16 precision)."""
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x).float()
        cache = model.new_cache(2)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 16)]
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert model.new_cache(2).k.dtype == torch.float32  # outside autocast: the weights' dtype
    assert torch.allclose(torch.cat(steps, 1).float(), full, atol=0.05)
    assert not torch.equal(full, model(x))  # autocast really lowered the matmuls


def test_left_padded_batch_matches_single_rows(model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batched = greedy_batch(model, prompts, max_new_tokens=8, stop_id=-1, pad_id=0)
    for p, out in zip(prompts, batched, strict=True):
        single = generate(model, p, SamplingParams(max_new_tokens=8, temperature=0))
        assert out == single


def test_greedy_with_and_without_cache_agree(model):
    params = SamplingParams(max_new_tokens=20, temperature=0)
    assert generate(model, [1, 2, 3], params, use_cache=True) == generate(model, [1, 2, 3], params, use_cache=False)


def test_sampling_is_reproducible_with_a_seed(model):
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a = generate(model, [1, 2, 3], params)
    assert a == generate(model, [1, 2, 3], params)
    assert a != generate(model, [1, 2, 3], SamplingParams(max_new_tokens=15, temperature=1.0, seed=4))


def test_stop_token_and_block_limit(model):
    first = generate(model, [1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert generate(model, [1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0, stop_ids={first})) == []
    long = generate(model, list(range(1, 40)), SamplingParams(max_new_tokens=100, temperature=0))
    assert len(long) <= 48 - 1


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = ~torch.isinf(filter_logits(probs, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]


def test_tiny_temperature_or_penalty_samples_the_top_token_instead_of_failing():
    logits = torch.tensor([[1.0, 30.0, 2.0, 29.0]])
    seen = torch.tensor([[3]])
    for params in (
        SamplingParams(temperature=1e-40, seed=1),
        SamplingParams(temperature=1e-3, top_p=0.5),
        SamplingParams(temperature=1.0, repetition_penalty=1e-40, top_k=2),
    ):
        picks = {int(sample_next(logits, params, seen, torch.Generator().manual_seed(i))) for i in range(20)}
        assert picks == ({3} if params.repetition_penalty < 1 else {1}), params


def test_repetition_penalty_discourages_seen_tokens(model):
    plain = generate(model, [1, 2, 3], SamplingParams(max_new_tokens=30, temperature=0))
    penalised = generate(model, [1, 2, 3], SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=5.0))
    assert len(set(penalised)) > len(set(plain))


def test_attention_probabilities(model):
    x = torch.randint(0, 97, (1, 12))
    logits, attn = model.forward_with_attention(x)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert len(attn) == 2 and attn[0].shape == (1, 4, 12, 12)
    assert torch.allclose(attn[0].sum(-1), torch.ones(1, 4, 12), atol=1e-5)
    assert float(attn[1].triu(1).abs().sum()) == 0.0  # causal


def test_seed_recipe_is_about_67m_parameters():
    r = load_recipe(REPO / "recipes" / "seed-67m.toml")
    m = r.model
    model = GPT(
        GPTConfig(
            vocab_size=r.tokenizer.vocab_size,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_embd=m.n_embd,
            block_size=m.block_size,
        )
    )
    assert 60e6 < model.num_parameters() < 70e6


def test_tied_embeddings_and_resize(model):
    m = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16))
    assert m.lm_head.weight is m.tok_emb.weight
    old = m.tok_emb.weight.detach().clone()
    m.resize_vocab(60)
    assert m.tok_emb.weight.shape == (60, 16) and m.lm_head.weight is m.tok_emb.weight
    assert torch.equal(m.tok_emb.weight[:50], old)
    assert torch.allclose(m.tok_emb.weight[55], old.mean(0))
    assert m(torch.tensor([[59]])).shape == (1, 1, 60)
