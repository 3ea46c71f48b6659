"""Issue 5 (part B): automatic bf16, MFU, AdamW/Muon with checkpointable state, activation checkpointing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.model import GPT, GPTConfig, SwiGLU, lm_loss
from lmforge.train import precision
from lmforge.train.checkpoint import load_trainer_state, read_state, save_checkpoint
from lmforge.train.distributed import Parallel
from lmforge.train.optim import make_optimizer

from .conftest import tiny_recipe

CPU = torch.device("cpu")


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=2, n_embd=32, block_size=16))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (4, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def train_steps(model: GPT, opt, n: int, seed: int = 1) -> None:
    for i in range(n):
        x, y = batch(seed + i)
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


# --------------------------------------------------------------------------- precision


def test_auto_dtype_is_bf16_exactly_when_the_cpu_has_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_dtype("auto", CPU) == torch.bfloat16
    assert precision.resolve_dtype("float32", CPU) == torch.float32  # the flag that forces fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_dtype("auto", CPU) == torch.float32
    assert precision.resolve_dtype("bfloat16", CPU) == torch.bfloat16


def test_native_bf16_detection_agrees_with_the_kernel_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert precision.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_flops_per_token_is_six_n_plus_attention():
    cfg = GPTConfig(vocab_size=1000, n_layer=3, n_head=4, n_embd=64, block_size=32)
    model = GPT(cfg)
    d, h, v = cfg.n_embd, cfg.hidden_dim, cfg.vocab_size
    matmul_params = cfg.n_layer * (4 * d * d + 3 * d * h) + v * d  # blocks + tied output matrix
    norm_params = (2 * cfg.n_layer + 1) * d
    assert model.num_parameters() == matmul_params + norm_params
    expected = 6 * (matmul_params + norm_params) + 12 * cfg.n_layer * d * cfg.block_size
    assert precision.flops_per_token(cfg, model.num_parameters()) == expected


def test_cpu_mfu_uses_a_measured_peak():
    meter = precision.MFUMeter(GPTConfig(vocab_size=96), 1000, CPU, torch.float32)
    assert meter.peak is not None and meter.peak > 1e8  # any CPU does > 0.1 GFLOP/s
    assert "measured" in meter.source
    assert meter.mfu(meter.peak / meter.flops_per_token) == pytest.approx(1.0)
    # fine-tuning runs the output layer at the answer tokens only: the FLOPs it skips are not counted
    head = 6.0 * 96 * GPTConfig(vocab_size=96).n_embd
    tok_s = meter.peak / meter.flops_per_token
    assert meter.mfu(tok_s, output_fraction=0.25) == pytest.approx(1.0 - 0.75 * head / meter.flops_per_token)


def test_training_metrics_report_mfu(tiny_run):
    train = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in train if r.get("split") == "train"]
    assert mfus and all(0 < m < 1.5 for m in mfus)  # measured peak is noisy on a shared machine


def test_bf16_autocast_is_used_for_training_matmuls():
    model = small_model()
    x, _ = batch()
    with precision.autocast(CPU, torch.bfloat16):
        assert model.layers[0].mlp.up_proj(model.tok_emb(x)).dtype == torch.bfloat16
    with precision.autocast(CPU, torch.float32):
        assert model.layers[0].mlp.up_proj(model.tok_emb(x)).dtype == torch.float32


def test_bf16_forward_casts_each_normed_input_once_and_rotates_q_k_in_bf16(monkeypatch):
    """Under bf16 autocast the rotary tables are bf16, so attention gets bf16 q and k (no fp32 rotation for
    autocast to cast back), and each block casts its two normed inputs once, not once per projection: a
    2-layer model makes 2 x 2 + 1 (output layer) activation casts in its forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import lmforge.model as model_module

    attention_dtypes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        attention_dtypes.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)

    class ActivationCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 3:  # (B, T, C); weights are 2-D
                ActivationCasts.count += 1
            return func(*args, **(kwargs or {}))

    model = small_model()
    x, _ = batch()
    with ActivationCasts(), precision.autocast(CPU, torch.bfloat16):
        model(x)
    assert attention_dtypes == [(torch.bfloat16,) * 3] * 2
    assert ActivationCasts.count == 2 * 2 + 1


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU, OpenMP barriers make 2 threads many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def curve(run_dir: Path, dtype: str) -> tuple[list[float], float]:
    from lmforge.pipeline import pretrain_stage
    from lmforge.rundir import RunDir

    run = RunDir(run_dir)
    run.metrics.unlink(missing_ok=True)  # the copied run's own history
    recipe = tiny_recipe(
        **{
            "pretrain.max_steps": "200",
            "pretrain.batch_size": "8",
            "model.block_size": "64",
            "pretrain.eval_interval": "200",
            "pretrain.log_interval": "20",
            "pretrain.dtype": dtype,
        }
    )
    result = pretrain_stage(recipe, run)
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return [
        r["loss"] for r in records if r.get("split") == "train" and r.get("stage") == "pretrain"
    ], result.last_val_loss


@pytest.mark.slow
def test_bf16_and_fp32_loss_curves_agree(copy_run, one_thread):
    """200 tiny-recipe steps: bf16 autocast tracks fp32 within 3% of the train loss at every logged step and
    within 2.5% of the final validation loss (the trajectories drift apart slowly; measured ~1.4% and ~1%)."""
    run = copy_run()
    fp32, fp32_val = curve(run, "float32")
    shutil.rmtree(run)
    bf16, bf16_val = curve(copy_run(), "bfloat16")
    assert len(fp32) == len(bf16) == 10
    assert fp32[-1] < fp32[0] - 0.5  # it learned
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) / a < 0.03
    assert abs(fp32_val - bf16_val) / fp32_val < 0.025


# --------------------------------------------------------------------------- optimizers


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = small_model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == (p.dim() == 2 and name != "tok_emb.weight"), name
    n_adamw = sum(len(g["params"]) for g in adamw.param_groups)
    assert n_adamw + len(muon_ids) == len(list(model.parameters()))


def test_lr_schedule_scales_each_group_from_its_own_peak():
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05)
    opt = make_optimizer(small_model(), cfg, CPU)
    opt.set_lr(cfg, 0.5)
    adamw, muon = opt.optimizers
    assert {g["lr"] for g in adamw.param_groups} == {5e-4}
    assert {g["lr"] for g in muon.param_groups} == {0.025}


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_optimizer_state_round_trips_through_a_checkpoint(kind, tmp_path):
    """Saved to safetensors + JSON and loaded into a fresh model, training continues bit for bit."""
    cfg = TrainConfig(optimizer=kind, lr=1e-2)
    model = small_model()
    opt = make_optimizer(model, cfg, CPU)
    train_steps(model, opt, 3)
    save_checkpoint(tmp_path / "ck", model, {"step": 3}, {"optimizer": opt.state_dict()})

    restored = small_model(seed=99)
    restored.load_state_dict(model.state_dict())
    opt2 = make_optimizer(restored, cfg, CPU)
    opt2.load_state_dict(load_trainer_state(tmp_path / "ck", read_state(tmp_path / "ck"))["optimizer"])
    train_steps(model, opt, 2, seed=10)
    train_steps(restored, opt2, 2, seed=10)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resuming_with_another_optimizer_is_a_clear_error():
    model = small_model()
    opt = make_optimizer(model, TrainConfig(optimizer="adamw"), CPU)
    train_steps(model, opt, 1)
    other = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    with pytest.raises(LmforgeError, match="optimizer is 'adamw'.*'muon'"):
        other.load_state_dict(opt.state_dict())


def test_optimizer_config_is_validated():
    with pytest.raises(ConfigError, match="pretrain.optimizer"):
        tiny_recipe(**{"pretrain.optimizer": "sgd"})
    with pytest.raises(ConfigError, match="pretrain.optimizer: muon"):
        tiny_recipe(**{"pretrain.optimizer": "muon", "pretrain.distributed": "fsdp"})
    with pytest.raises(ConfigError, match="pretrain.compile"):
        tiny_recipe(**{"pretrain.compile": "maybe"})


def test_fused_adamw_is_used_where_available():
    opt = make_optimizer(small_model(), TrainConfig(), CPU)
    assert opt.optimizers[0].defaults["fused"] is True


# --------------------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_keeps_names_and_gradients(monkeypatch):
    plain, wrapped = small_model(), small_model()
    engine = Parallel().wrap(wrapped, TrainConfig(activation_checkpointing=True))
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints stay loadable
    calls = []
    forward = SwiGLU.forward
    monkeypatch.setattr(SwiGLU, "forward", lambda self, x: calls.append(1) or forward(self, x))
    x, y = batch()
    for model, recomputed in ((plain, 0), (engine, 2)):
        loss = lm_loss(model(x), y)
        calls.clear()
        loss.backward()
        assert len(calls) == recomputed  # with checkpointing each block's MLP runs again in backward
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow
def test_compiled_model_trains_like_eager():
    eager, compiled = small_model(), small_model()
    engine = Parallel().wrap(compiled, TrainConfig(compile=True))
    assert engine is not compiled and engine._orig_mod is compiled  # checkpoints still read `compiled`
    x, y = batch()
    a, b = lm_loss(eager(x), y), lm_loss(engine(x), y)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("varying_shapes", [True, False])
def test_fine_tuning_compiles_the_blocks_once_for_every_batch_shape(varying_shapes):
    """Fine-tuning's batches change length every step and row count at an epoch's end: wrapped with
    varying_shapes, the compiled blocks take them all without compiling again; without it (pretraining's
    fixed windows) a new shape recompiles them. (The output layer after the scored-position graph break
    compiles once more, cheaply, when the number of scored tokens first changes: here it stays 12.)"""
    import torch._dynamo as dynamo

    from lmforge.train.loop import batch_loss

    def qa_batch(rows: int, length: int, answer_tokens: int):
        ids = torch.randint(0, 96, (rows, length))
        targets = torch.full_like(ids, -100)
        targets[:, -answer_tokens:] = ids[:, -answer_tokens:]
        return ids, targets

    dynamo.reset()
    engine = Parallel().wrap(small_model(), TrainConfig(compile=True), varying_shapes=varying_shapes)
    batch_loss(engine, *qa_batch(4, 12, 3), sparse_targets=True).backward()  # compiles
    recompiled = False
    try:
        with dynamo.config.patch(error_on_recompile=True):
            for rows, length, answer_tokens in [(4, 9, 3), (6, 14, 2)]:
                batch_loss(engine, *qa_batch(rows, length, answer_tokens), sparse_targets=True).backward()
    except Exception as error:  # dynamo's RecompileError, raised through the compiled call
        assert "Recompil" in type(error).__name__ + str(error), error
        recompiled = True
    finally:
        dynamo.reset()
    assert recompiled is not varying_shapes


def test_fp32_and_distributed_flags_set_both_training_stages():
    from lmforge.cli import build_parser, training_overrides

    args, _ = build_parser().parse_known_args(["run", "tiny", "--fp32", "--distributed", "ddp"])
    overrides = training_overrides(args, {"finetune.dtype": "bfloat16"})
    recipe = tiny_recipe(**overrides)
    assert recipe.pretrain.dtype == "float32" and recipe.pretrain.distributed == "ddp"
    assert recipe.finetune.distributed == "ddp"
    assert recipe.finetune.dtype == "bfloat16"  # an explicit override wins over the shorthand
    assert recipe.seed == tiny_recipe().seed  # no --seed: the recipe's


def test_seed_flag_sets_the_recipe_seed_but_not_generate_sampling():
    from lmforge.cli import build_parser, training_overrides

    args, _ = build_parser().parse_known_args(["pretrain", "tiny", "--seed", "7"])
    assert tiny_recipe(**training_overrides(args, {})).seed == 7
    args, _ = build_parser().parse_known_args(["generate", "--run-dir", "r", "hello", "--seed", "7"])
    assert training_overrides(args, {}) == {} and args.seed == 7  # generate's own sampling seed


FAULTS_SCRIPT = """
import resource, sys, torch
from lmforge.train import precision
kept = precision.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20)  # 64 MiB, freed at once: as a step's logits are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(), faults()  # the heap grows to hold the block before it can keep it
print(kept, faults())
"""


def page_faults(mode: str, **env: str) -> tuple[str, int]:
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k not in ("LMFORGE_SYSTEM_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode],
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_keeping_freed_memory_stops_repeated_allocations_faulting_pages_in_again():
    """glibc gives a freed 64 MiB block back to the kernel, so the next one page-faults all 16,384 pages in
    again; with keep_freed_memory the heap reuses it. LMFORGE_SYSTEM_MALLOC=1 leaves malloc alone."""
    kept, faults_default = page_faults("default")
    assert faults_default > 5 * 16_000  # every allocation faulted in afresh
    kept, faults_kept = page_faults("keep")
    assert kept == "True" and faults_kept < 1_000
    kept, faults_opted_out = page_faults("keep", LMFORGE_SYSTEM_MALLOC="1")
    assert kept == "False" and faults_opted_out > 5 * 16_000


def test_training_and_evaluation_keep_freed_memory(monkeypatch, tmp_path):
    from lmforge import pipeline
    from lmforge.data.qa import EncodedQA, QABatcher
    from lmforge.rundir import RunDir
    from lmforge.train import loop

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append("train"))
    items = [EncodedQA(list(range(1, n + 1)), prompt_len=n - 2) for n in (5, 9, 14, 16)]
    run = RunDir(tmp_path / "qa")
    run.root.mkdir()
    cfg = TrainConfig(max_steps=1, batch_size=4, warmup_steps=1, eval_interval=100, checkpoint_interval=100)
    batches = QABatcher(items, batch_size=4, pad_id=0, seed=1)
    loop.train_stage(small_model(), batches, QABatcher(items, 4, 0, seed=2), cfg, run, "finetune", 1, seed=5)
    assert calls == ["train"]
    monkeypatch.setattr(pipeline, "keep_freed_memory", lambda: calls.append("eval"))
    with pytest.raises(LmforgeError):  # no checkpoint to evaluate: it fails after keeping memory
        pipeline.eval_stage(tiny_recipe(), run)
    assert calls == ["train", "eval"]
